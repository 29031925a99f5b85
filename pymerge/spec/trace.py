"""Derive a PermutationSpec from an nn.Module with torch.fx (work in progress)."""

from __future__ import annotations

from typing import Any

__all__ = ["spec_from_model"]


def spec_from_model(model: Any, example_inputs: Any, *, overrides: Any = None,
                    leaf_modules: Any = ()) -> Any:
    raise NotImplementedError("spec_from_model is being implemented")
