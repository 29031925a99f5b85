"""The counter-based stream: the vectorised torch form equals the scalar definition."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import rng


def _scalar(seed: int, key: str, i: int) -> float:
    z = rng.splitmix64_int((rng.stream_key(seed, key) + i * rng.GOLDEN) % 2**64)
    return (z >> 40) * 2.0**-24


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1])
@pytest.mark.parametrize("key", ["", "model.layers.0.mlp.up_proj.weight", "ü"])
def test_uniform_equals_scalar_definition(seed, key):
    u = rng.uniform(seed, key, 257)
    ref = torch.tensor([_scalar(seed, key, i) for i in range(257)], dtype=torch.float32)
    assert u.dtype == torch.float32
    assert torch.equal(u, ref)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_streams_differ_by_key_and_seed_and_look_uniform():
    a = rng.uniform(0, "a", 100_000)
    b = rng.uniform(0, "b", 100_000)
    c = rng.uniform(1, "a", 100_000)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    for u in (a, b, c):
        assert abs(float(u.mean()) - 0.5) < 0.005
        hist = torch.histc(u, bins=10, min=0.0, max=1.0)
        assert float((hist - 10_000).abs().max()) < 500  # ~5 sigma
    # prefixes agree: element i does not depend on how many are drawn
    assert torch.equal(rng.uniform(7, "w", 10), rng.uniform(7, "w", 1000)[:10])
