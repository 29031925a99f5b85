"""A counter-based random stream: the same numbers on every backend, in any order.

DARE, DELLA and every other stochastic merge draw their random numbers here, so the torch
reference, the C++ loops and the Triton kernels give the same masks for a seed. Element ``i``
(flat, C order) of the tensor stored under ``key`` gets

    z = splitmix64(stream(seed, key) + i * GOLDEN)
    u = (z >> 40) * 2**-24                      # 24-bit uniform in [0, 1), exact in float32

with ``stream(seed, key) = splitmix64(seed) ^ fnv1a64(key.encode("utf-8"))`` and
``splitmix64(x)`` the finaliser of Steele, Lea and Flood's SplitMix64 (2014): ``x += GOLDEN;
x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9; x = (x ^ (x >> 27)) * 0x94D049BB133111EB;
x ^= x >> 31`` (all arithmetic modulo 2**64). No state is kept: any element can be drawn
alone, tensors can be processed in any order or in parallel, and a tensor's stream does not
depend on the other keys of the state dict.
"""

from __future__ import annotations

import torch

__all__ = ["GOLDEN", "stream_key", "uniform", "splitmix64_int"]

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def splitmix64_int(x: int) -> int:
    """SplitMix64 of a Python int (modulo 2**64): the scalar reference."""
    x = (x + GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & _MASK
    return h


def stream_key(seed: int, key: str) -> int:
    """The 64-bit stream offset of tensor ``key`` under ``seed`` (an unsigned Python int)."""
    return splitmix64_int(int(seed) & _MASK) ^ _fnv1a64(key.encode("utf-8"))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(
    seed: int, key: str, numel: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 ``[numel]`` of the stream of ``key``: element ``i`` is ``u_i`` above.

    Computed in int64 with wrap-around multiplication (two's complement, as torch does on
    every device), which equals the modulo-2**64 arithmetic of the definition.
    """
    base = _signed(stream_key(seed, key))
    i = torch.arange(numel, dtype=torch.int64, device=device)
    x = i * _signed(GOLDEN) + _signed(base + GOLDEN)  # splitmix64's first step folded in
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    x = x ^ _shr(x, 31)
    return _shr(x, 40).to(torch.float32) * (2.0**-24)
