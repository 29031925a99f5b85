"""Argument types for the commands, built on the library's scalar checks
(:mod:`pymerge._util.args`): a bad value is an argparse usage error (exit status 2) that
names the option and the value it got."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pymerge._util.args import check_fraction, check_int, check_seed

__all__ = ["int_at_least", "seed", "fraction"]


def _parse_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _as_type(check: Callable[[Any], Any], name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def check(text: str) -> int:
        value = check_int(_parse_int(text), "value", minimum=minimum)
        if maximum is not None and value > maximum:
            raise ValueError(f"value must be <= {maximum}, got {value}")
        return value

    return _as_type(check, "integer")


seed = _as_type(lambda text: check_seed(_parse_int(text)), "seed")


def fraction(text: str) -> float:
    """An argparse type: a finite number in [0, 1] (NaN and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    try:
        return check_fraction(value, "value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
