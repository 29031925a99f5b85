"""interpolate / permuted_interpolate: both backends against a float64 reference.

The Triton kernels run in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1)
with tiny block sizes, so every tensor spans several chunks/tiles and has a masked tail.
Outputs of the Triton path are allocated NaN-filled (poisoned) before the kernels write.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymerge._backend import native_multi_tensor, triton_error, triton_interpret
from pymerge.ops import interpolate, permuted_interpolate

# subprocesses run from here so `python -c` imports the installed pymerge, not the
# source tree of the checkout (which has no compiled _lap and no pymerge.kernels)
_HERE = os.path.dirname(os.path.abspath(__file__))

front = sys.modules["pymerge.ops.interpolate"]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"

_TRITON_OK = triton_error() is None and (torch.cuda.is_available() or triton_interpret())
_NATIVE_OK = native_multi_tensor() is not None and DEV == "cpu"
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not _TRITON_OK, reason="triton missing, or CPU without TRITON_INTERPRET=1"
        ),
    ),
]
# both ops also have C++ loops over CPU buffers
INTERP_BACKENDS = [
    *BACKENDS,
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not _NATIVE_OK, reason="pymerge._multi_tensor not built, or tensors on CUDA"
        ),
    ),
]
# backends that compute in fp32 and round once
_ONE_ROUNDING = ("triton", "native")


@pytest.fixture(autouse=True)
def _small_blocks_and_poison(monkeypatch):
    """Tiny kernel blocks (tails, many tiles, several column segments) + NaN-poisoned outputs."""
    if _TRITON_OK:
        from pymerge.kernels import interpolate as ki
        from pymerge.kernels import permuted_interpolate as kp

        monkeypatch.setattr(ki, "DEFAULT_BLOCK", 16)
        monkeypatch.setattr(ki, "DEFAULT_NUM_WARPS", 1)
        monkeypatch.setattr(kp, "DEFAULT_BR", 2)
        monkeypatch.setattr(kp, "DEFAULT_BC", 4)
        monkeypatch.setattr(kp, "DEFAULT_SEG", 8)
        monkeypatch.setattr(kp, "DEFAULT_NUM_WARPS", 1)

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(front, "_empty", poisoned)


# ----------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, g, *, noncontig: str | None = None) -> torch.Tensor:
    """Random tensor; noncontig: 'T' transposed view, 'step' strided slice, 'off' offset view."""
    if noncontig == "T":
        t = torch.randn(tuple(reversed(shape)), generator=g).to(dtype).t()
    elif noncontig == "step":
        t = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g).to(dtype)[..., ::2]
    elif noncontig == "off":  # contiguous but starts one element in: unaligned pointer
        n = torch.Size(shape).numel()
        t = torch.randn(n + 1, generator=g).to(dtype)[1:].view(shape)
    else:
        t = torch.randn(shape, generator=g).to(dtype)
    return t.to(DEV)


# (key, shape, dtype, non-contiguity)
LAYOUT = [
    ("scalar", (), F32, None),
    ("one", (1,), BF16, None),
    ("bias", (17,), F16, None),
    ("lin.weight", (5, 7), F32, None),
    ("lin_t.weight", (6, 9), BF16, "T"),
    ("conv.weight", (4, 3, 3, 3), F16, None),
    ("conv2.weight", (3, 5, 2, 2), F32, "step"),
    ("tall", (33, 1), BF16, None),
    ("wide", (1, 41), F32, "off"),
    ("empty", (0, 3), F32, None),
    ("fc.weight", (6, 16), BF16, None),  # C % 8 == 0: aligned fast path, full tiles
    ("fc2.weight", (5, 24), F32, None),  # aligned, odd rows: full and partial tiles
    ("ln.weight", (24,), F16, None),
    ("bn.num_batches_tracked", (), torch.int64, None),
    ("mask", (4,), torch.bool, None),
]


def _state(seed: int, layout=LAYOUT) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    out = {}
    for key, shape, dtype, nc in layout:
        if dtype == torch.int64:
            out[key] = torch.tensor(seed + 10, device=DEV)
        elif dtype == torch.bool:
            out[key] = (torch.randn(shape, generator=g) > 0).to(DEV)
        else:
            out[key] = _rand(shape, dtype, g, noncontig=nc)
    return out


def _snapshot(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def _assert_unchanged(states, snaps):
    for s, c in zip(states, snaps, strict=True):
        for k in c:
            assert torch.equal(s[k], c[k]), f"input {k} was modified"


def _assert_close(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, roundings: int, key):
    """|out - ref| <= roundings * eps(out dtype) * scale + fp32 accumulation slack."""
    assert out.shape == ref.shape, key
    assert torch.isfinite(out).all(), f"{key}: non-finite output (unwritten poisoned element?)"
    fi = torch.finfo(out.dtype)
    tol = roundings * fi.eps * scale + 8 * torch.finfo(F32).eps * scale + fi.smallest_normal
    err = (out.double().cpu() - ref).abs()
    assert (err <= tol).all(), f"{key}: max err {err.max().item():.3g} (dtype {out.dtype})"


def _f32(x: float) -> float:
    """Weights and alphas are applied in fp32 (documented): references use the same value."""
    return float(torch.tensor(x, dtype=torch.float32))


def _float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


# ----------------------------------------------------------------------------- interpolate


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_interpolate_matches_float64_reference(backend, K):
    states = [_state(100 * K + i) for i in range(K)]
    snaps = _snapshot(states)
    weights = torch.randn(K, generator=_gen(K)).tolist()  # need not sum to 1 (exact in fp32)
    out = interpolate(states, weights, backend=backend)
    assert list(out) == list(states[0])
    for k in _float_keys(states[0]):
        ref = sum(w * s[k].double().cpu() for w, s in zip(weights, states, strict=True))
        scale = sum(
            abs(w) * s[k].double().cpu().abs() for w, s in zip(weights, states, strict=True)
        )
        assert out[k].dtype == states[0][k].dtype
        rounds = 1 if backend in _ONE_ROUNDING else K
        _assert_close(out[k], ref, scale, rounds, k)
    _assert_unchanged(states, snaps)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
@pytest.mark.parametrize(
    "weights",
    [
        [1.0, 0.5],
        [1.0, 0.5, -0.3],
        [2.0],
        [0.0, 0.0, 0.0],
        [0.01, 0.7, 0.5],
        [1e-5, 1.0],
        [-3.0, 0.5],
    ],
)
def test_interpolate_special_weight_patterns(backend, weights):
    """Task arithmetic (w0 = 1), K = 1 scaling, all-zero weights, tiny and negative w0."""
    K = len(weights)
    states = [_state(200 + i) for i in range(K)]
    out = interpolate(states, weights, backend=backend)
    for k in _float_keys(states[0]):
        ref = sum(w * s[k].double().cpu() for w, s in zip(weights, states, strict=True))
        scale = sum(
            abs(w) * s[k].double().cpu().abs() for w, s in zip(weights, states, strict=True)
        )
        _assert_close(out[k], ref, scale, 1 if backend in _ONE_ROUNDING else K, k)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_convex_weights_and_tensor_weights(backend):
    states = [_state(1), _state(2)]
    w = torch.tensor([0.25, 0.75])
    out = interpolate(states, w, backend=backend)
    for k in _float_keys(states[0]):
        ref = 0.25 * states[0][k].double().cpu() + 0.75 * states[1][k].double().cpu()
        scale = 0.25 * states[0][k].double().cpu().abs() + 0.75 * states[1][k].double().cpu().abs()
        _assert_close(out[k], ref, scale, 1, k)  # lerp path: one rounding on torch too


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_endpoints_exact(backend):
    states = [_state(3), _state(4)]
    for w, src in (([1.0, 0.0], 0), ([0.0, 1.0], 1)):
        out = interpolate(states, w, backend=backend)
        for k in _float_keys(states[0]):
            assert torch.equal(out[k], states[src][k]), k


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_nonfloating_copied_from_first(backend):
    states = [_state(5), _state(6), _state(7)]
    out = interpolate(states, [0.2, 0.3, 0.5], backend=backend)
    for k in ("bn.num_batches_tracked", "mask"):
        assert torch.equal(out[k], states[0][k])
        assert out[k].data_ptr() != states[0][k].data_ptr()  # a clone, no aliasing
    assert int(out["bn.num_batches_tracked"]) == 15


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
@pytest.mark.parametrize(("in_dtype", "out_dtype"), [(BF16, F32), (F32, F16)])
def test_interpolate_out_dtype(backend, in_dtype, out_dtype):
    layout = [(k, s, in_dtype, nc) for k, s, d, nc in LAYOUT if d.is_floating_point]
    states = [_state(8, layout), _state(9, layout)]
    w = [0.7, -1.1]
    out = interpolate(states, w, backend=backend, out_dtype=out_dtype)
    for k in out:
        assert out[k].dtype == out_dtype
        ref = w[0] * states[0][k].double().cpu() + w[1] * states[1][k].double().cpu()
        scale = 0.7 * states[0][k].double().cpu().abs() + 1.1 * states[1][k].double().cpu().abs()
        _assert_close(out[k], ref, scale, 1 if backend in _ONE_ROUNDING else 2, k)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_channels_last_and_mixed_layouts(backend):
    """Channels-last conv weights next to contiguous ones: values as if contiguous."""
    g = _gen(31)
    states = [
        {
            "conv": torch.randn(5, 3, 4, 6, generator=g)
            .to(DEV)
            .to(memory_format=torch.channels_last),
            "lin": torch.randn(7, 5, generator=g).to(DEV),
        }
        for _ in range(3)
    ]
    w = [0.5, -0.25, 1.5]
    out = interpolate(states, w, backend=backend)
    for k in states[0]:
        ref = sum(wk * s[k].double().cpu() for wk, s in zip(w, states, strict=True))
        scale = sum(abs(wk) * s[k].double().cpu().abs() for wk, s in zip(w, states, strict=True))
        _assert_close(out[k], ref, scale, 1 if backend in _ONE_ROUNDING else 3, k)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_outputs_do_not_alias_inputs(backend):
    states = [_state(10)]
    out = interpolate(states, [1.0], backend=backend)
    for k in _float_keys(states[0]):
        if out[k].numel():
            out[k].add_(1)  # must not write through to the input
    _assert_unchanged(states, _snapshot([_state(10)]))


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_outputs_do_not_require_grad(backend):
    layout = [("w", (3, 8), F32, None), ("b", (8,), F32, None)]
    a, b = _state(17, layout), _state(18, layout)
    for s in (a, b):
        for t in s.values():
            t.requires_grad_(True)
    out = interpolate([a, b], [0.2, 0.9], backend=backend)
    pout = permuted_interpolate(a, b, 0.5, {"w": ((1, torch.randperm(8)),)}, backend=backend)
    for o in (out, pout):
        assert not any(t.requires_grad for t in o.values())
    ref = 0.2 * a["w"].detach().double() + 0.9 * b["w"].detach().double()
    assert torch.allclose(out["w"].double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_repeated_calls_see_new_values(backend):
    """Launch tables are cached by pointer: values changed in place must still be read."""
    states = [_state(11), _state(12)]
    first = interpolate(states, [0.5, 0.5], backend=backend)
    for s in states:
        for k in _float_keys(s):
            s[k].mul_(-2.0)  # same pointers, new values
    second = interpolate(states, [0.5, 0.5], backend=backend)
    for k in _float_keys(states[0]):
        expect = (first[k].double() * -2.0).to(first[k].dtype)
        assert torch.allclose(second[k].double(), expect.double(), rtol=1e-2, atol=1e-3), k


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_interpolate_nan_inf_propagate(backend):
    layout = [("a", (3, 11), F32, None), ("b", (20,), BF16, None)]
    states = [_state(13, layout), _state(14, layout)]
    states[0]["a"][1, 2] = float("nan")
    states[1]["a"][2, 10] = float("inf")
    states[1]["b"][5] = float("-inf")
    for w in ([0.5, 0.5], [1.0, 0.0], [0.3, 0.9]):
        out = interpolate(states, w, backend=backend)
        for k in out:
            bad = ~torch.isfinite(states[0][k]) | ~torch.isfinite(states[1][k])
            assert torch.equal(~torch.isfinite(out[k]), bad), (k, w)
            ref = w[0] * states[0][k].double() + w[1] * states[1][k].double()
            assert torch.allclose(out[k][~bad].double(), ref[~bad], rtol=2e-2, atol=1e-3)
    # 0 * inf = nan, as torch computes it
    out = interpolate(states, [1.0, 0.0], backend=backend)
    assert torch.isnan(out["a"][2, 10])


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_half_sums_accumulate_in_float32_on_every_path(backend):
    """fp16/bf16 sums of several terms are accumulated in fp32 and rounded once, whichever
    path runs: partial sums past fp16's 65504 do not become inf, and a cancellation keeps
    the bits a bf16 partial sum would round away."""
    n = 37  # a masked tail on every path
    big = torch.full((n,), 40000.0, dtype=F16, device=DEV)
    states = [{"w": big.clone()} for _ in range(3)]
    for w in ([1.0, 1.0, -1.0], [0.9, 0.9, -0.8], [0.5, 1.0, -0.5], [1.5, -0.5]):
        out = interpolate(states[: len(w)], w, backend=backend)["w"]
        w32 = [float(torch.tensor(v, dtype=F32)) for v in w]
        ref = torch.full((n,), sum(v * 40000.0 for v in w32), dtype=torch.float64).to(F16)
        assert torch.equal(out.cpu(), ref), (w, out[:3])
    # bf16: (1 + u) + 256 - 256 = 1 + u exactly (a bf16 partial sum 257 + u would lose u)
    u = torch.arange(n, dtype=F32, device=DEV) % 8 / 128
    bf = [{"w": (1 + u).to(BF16)}, {"w": torch.full((n,), 256.0, dtype=BF16, device=DEV)}]
    bf.append({"w": bf[1]["w"].clone()})
    for w in ([1.0, 1.0, -1.0], [1.0, 0.5, -0.5]):
        out = interpolate(bf, w, backend=backend)["w"]
        assert torch.equal(out, (1 + u).to(BF16)), (w, out[:8])
    # permuted: a lerp computed in fp32 (60000 - 60000 overflows fp16, not fp32)
    a = {"w": torch.full((4, 9), 60000.0, dtype=F16, device=DEV)}
    b = {"w": torch.full((4, 9), -60000.0, dtype=F16, device=DEV)}
    axes = {"w": ((0, torch.tensor([3, 1, 0, 2])),)}
    outs = permuted_interpolate(a, b, [0.25, 0.5], axes, backend=backend)
    assert torch.equal(outs[0]["w"].cpu(), torch.full((4, 9), 30000.0, dtype=F16))
    assert torch.equal(outs[1]["w"].cpu(), torch.zeros(4, 9, dtype=F16))


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_torch_path_rounds_half_sums_once(dtype):
    """The torch fallback's error for general weights is one rounding of the storage dtype
    plus fp32 accumulation error (it was up to K roundings of the storage dtype)."""
    g = _gen(77)
    K, n = 5, 4099
    xs = [torch.randn(n, generator=g).mul_(4).to(dtype) for _ in range(K)]
    w = torch.randn(K, generator=g).tolist()
    w32 = [float(torch.tensor(v, dtype=F32)) for v in w]
    out = interpolate([{"x": x} for x in xs], w, backend="torch")["x"].double()
    ref = sum(wk * x.double() for wk, x in zip(w32, xs, strict=True))
    scale = sum(abs(wk) * x.double().abs() for wk, x in zip(w32, xs, strict=True))
    tol = torch.finfo(dtype).eps / 2 * ref.abs() + 2 * K * torch.finfo(F32).eps * scale
    tiny = torch.finfo(dtype).tiny if dtype == BF16 else 2.0**-24  # subnormal spacing
    assert ((out - ref).abs() <= tol + tiny).all()


def test_interpolate_backends_agree():
    if not _TRITON_OK:
        pytest.skip("triton unavailable here; both paths are checked against float64 elsewhere")
    states = [_state(15), _state(16)]
    a = interpolate(states, [0.5, 0.5], backend="torch")
    b = interpolate(states, [0.5, 0.5], backend="triton")
    for k in a:  # lerp (torch) vs fp32 weighted sum (triton): at most one ulp apart
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-2, atol=1e-6), k


def test_interpolate_errors():
    s1, s2 = _state(1), _state(2)
    with pytest.raises(ValueError, match="empty"):
        interpolate([], [])
    with pytest.raises(TypeError, match="sequence of state dicts"):
        interpolate(s1, [1.0])
    with pytest.raises(ValueError, match="2 weights for 3"):
        interpolate([s1, s2, s2], [0.5, 0.5])
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        interpolate([s1, s2], [0.5, "x"])
    missing = dict(s2)
    del missing["lin.weight"]
    with pytest.raises(ValueError, match=r"key .lin\.weight. is in states\[0\] but not in"):
        interpolate([s1, missing], [0.5, 0.5])
    extra = dict(s2, extra_key=torch.zeros(1))
    with pytest.raises(ValueError, match="key .extra_key. is in states"):
        interpolate([s1, extra], [0.5, 0.5])
    bad = dict(s2, bias=torch.zeros(18, dtype=F16))
    with pytest.raises(ValueError, match="key .bias. has shape"):
        interpolate([s1, bad], [0.5, 0.5])
    bad = dict(s2, bias=torch.zeros(17, dtype=F32))
    with pytest.raises(ValueError, match="key .bias. has dtype"):
        interpolate([s1, bad], [0.5, 0.5])
    with pytest.raises(TypeError, match="out_dtype"):
        interpolate([s1, s2], [0.5, 0.5], out_dtype=torch.int32)
    with pytest.raises(TypeError, match="complex"):
        interpolate([{"z": torch.zeros(2, dtype=torch.complex64)}], [1.0])
    with pytest.raises(TypeError, match="not a Tensor"):
        interpolate([{"z": [1.0]}], [1.0])
    with pytest.raises(ValueError, match="backend"):
        interpolate([s1], [1.0], backend="cuda-magic")


# ----------------------------------------------------------------------------- permuted


def _perm_setup(seed: int):
    """States, a plain spec_axes map (1 or 2 axes per param) and the gathered reference B."""
    g = _gen(seed)
    a, b = _state(seed), _state(seed + 1)
    rp = lambda n: torch.randperm(n, generator=g).to(DEV)  # noqa: E731
    p4, p3, p5 = rp(4), rp(3), rp(5)
    spec = {
        "lin.weight": ((0, p5), (1, rp(7))),  # both axes
        "lin_t.weight": ((1, rp(9)),),  # non-contiguous, column only
        "conv.weight": ((0, p4), (1, p3)),  # 4-D conv, out and in channels
        "conv2.weight": ((-3, rp(5)),),  # negative axis (= 1)
        "bias": ((0, rp(17)),),
        "tall": ((0, rp(33)),),
        "wide": ((1, rp(41)),),
        "empty": ((1, p3),),
        "fc.weight": ((0, rp(6)), (1, rp(16))),  # gathered columns
        "fc2.weight": ((0, p5),),  # rows only: contiguous B rows
        "ln.weight": ((0, rp(24)),),
    }
    bp = {}
    for k, v in b.items():
        t = v
        for axis, idx in spec.get(k, ()):
            t = t.index_select(axis, idx)
        bp[k] = t
    return a, b, spec, bp


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_interpolate_matches_gather_then_lerp(backend):
    a, b, spec, bp = _perm_setup(20)
    snaps = _snapshot([a, b])
    alpha = 0.37
    out = permuted_interpolate(a, b, alpha, spec, backend=backend)
    assert isinstance(out, dict) and list(out) == list(a)
    for k in _float_keys(a):
        ref = (1 - alpha) * a[k].double().cpu() + alpha * bp[k].double().cpu()
        scale = (1 - alpha) * a[k].double().cpu().abs() + alpha * bp[k].double().cpu().abs()
        assert out[k].dtype == a[k].dtype
        _assert_close(out[k], ref, scale, 1, k)
    for k in ("bn.num_batches_tracked", "mask"):
        assert torch.equal(out[k], a[k]) and out[k].data_ptr() != a[k].data_ptr()
    _assert_unchanged([a, b], snaps)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_many_alphas_equal_separate_calls_and_exact_endpoints(backend):
    a, b, spec, bp = _perm_setup(30)
    alphas = [0.0, 0.25, 0.5, 1.0, 1.5, -0.5]
    many = permuted_interpolate(a, b, alphas, spec, backend=backend)
    assert isinstance(many, list) and len(many) == len(alphas)
    for al, got in zip(alphas, many, strict=True):
        one = permuted_interpolate(a, b, al, spec, backend=backend)
        for k in a:
            assert torch.equal(got[k], one[k]), (al, k)
    for k in _float_keys(a):
        assert torch.equal(many[0][k], a[k]), k  # alpha = 0: exactly A
        assert torch.equal(many[3][k], bp[k]), k  # alpha = 1: exactly pi(B)
    # tensor of alphas and a 1-element list also return lists
    as_tensor = permuted_interpolate(a, b, torch.tensor([0.25]), spec, backend=backend)
    assert isinstance(as_tensor, list) and torch.equal(
        as_tensor[0]["conv.weight"], many[1]["conv.weight"]
    )


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_with_perm_groups(backend):
    a, b, _, _ = _perm_setup(40)
    g = _gen(41)
    perm = {"P4": torch.randperm(4, generator=g), "P3": torch.randperm(3, generator=g)}
    spec = {"conv.weight": ((0, "P4"), (1, "P3")), "empty": ((1, "P3"),)}
    out = permuted_interpolate(a, b, 0.5, spec, perm, backend=backend)
    plain = {k: tuple((ax, perm[gr].to(DEV)) for ax, gr in v) for k, v in spec.items()}
    ref = permuted_interpolate(a, b, 0.5, plain, backend=backend)
    for k in a:
        assert torch.equal(out[k], ref[k]), k
    bpk = b["conv.weight"][perm["P4"]][:, perm["P3"]]
    assert torch.equal(
        permuted_interpolate(a, b, 1.0, spec, perm, backend=backend)["conv.weight"], bpk
    )


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_identity_spec_is_plain_lerp(backend):
    a, b = _state(50), _state(51)
    out = permuted_interpolate(a, b, [0.3], {}, backend=backend)[0]
    lerp = interpolate([a, b], [0.7, 0.3], backend=backend)
    for k in _float_keys(a):
        ref = 0.7 * a[k].double().cpu() + 0.3 * b[k].double().cpu()
        scale = 0.7 * a[k].double().cpu().abs() + 0.3 * b[k].double().cpu().abs()
        _assert_close(out[k], ref, scale, 1, k)
        assert torch.allclose(out[k].double(), lerp[k].double(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_out_dtype_and_nan(backend):
    layout = [("w", (6, 5), BF16, None)]
    a, b = _state(60, layout), _state(61, layout)
    b["w"][4, 1] = float("nan")
    p0, p1 = torch.randperm(6, generator=_gen(1)), torch.randperm(5, generator=_gen(2))
    out = permuted_interpolate(
        a, b, [0.5, 1.0], {"w": ((0, p0), (1, p1))}, backend=backend, out_dtype=F32
    )
    assert out[0]["w"].dtype == F32
    bad = ~torch.isfinite(b["w"][p0][:, p1])
    for o in out:
        assert torch.equal(~torch.isfinite(o["w"]), bad)
    assert torch.equal(out[1]["w"][~bad], b["w"][p0][:, p1][~bad].float())


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_permuted_caches_follow_changed_indices_and_values(backend):
    """Validated indices, maps and launch tables are cached: in-place edits of the index
    tensors or of the weights, and fresh index objects, must all be seen."""
    layout = [("w", (6, 5), F32, None), ("v", (6,), BF16, None)]
    a, b = _state(71, layout), _state(72, layout)
    g = _gen(73)

    def check(spec):
        out = permuted_interpolate(a, b, [1.0, 0.5], spec, backend=backend)
        for k, axes in spec.items():
            ref = b[k]
            for ax, idx in axes:
                ref = ref.index_select(ax, idx)
            assert torch.equal(out[0][k], ref), k
            half = 0.5 * a[k].double() + 0.5 * ref.double()
            assert torch.allclose(out[1][k].double(), half, rtol=1e-2, atol=1e-6), k

    p0, p1 = torch.randperm(6, generator=g), torch.randperm(5, generator=g)
    spec = {"w": ((0, p0), (1, p1)), "v": ((0, p0),)}
    check(spec)
    check(spec)  # cached
    p0.copy_(torch.randperm(6, generator=g))  # same object, new values
    check(spec)
    b["w"].mul_(3.0)  # same pointers, new values
    a["v"].add_(1.0)
    check(spec)
    for _ in range(3):  # fresh objects every call (ids may be recycled)
        check({"w": ((0, torch.randperm(6, generator=g)), (1, torch.randperm(5, generator=g)))})
    with pytest.raises(ValueError, match="not a permutation"):
        p0.fill_(0)  # a cached index edited into an invalid one is re-validated
        permuted_interpolate(a, b, 0.5, spec, backend=backend)
    front.clear_caches()
    check({"w": ((0, torch.tensor([1, 0, 2, 3, 5, 4])),)})


def test_permuted_backends_agree():
    fast = (["triton"] if _TRITON_OK else []) + (["native"] if _NATIVE_OK else [])
    if not fast:
        pytest.skip("no triton and no C++ loops here; torch is checked against float64 elsewhere")
    a, b, spec, _ = _perm_setup(70)
    x = permuted_interpolate(a, b, [0.1, 0.9], spec, backend="torch")
    for be in fast:
        y = permuted_interpolate(a, b, [0.1, 0.9], spec, backend=be)
        for xo, yo in zip(x, y, strict=True):
            for k in a:
                assert torch.allclose(xo[k].double(), yo[k].double(), rtol=1e-2, atol=1e-6), k


@pytest.mark.skipif(not _NATIVE_OK, reason="pymerge._multi_tensor not built")
def test_permuted_native_simd_paths_bit_identical():
    """The scalar and AVX2 C++ loops: same bits for every dtype pair (gathers, tails)."""
    mt = native_multi_tensor()
    if "avx2" not in mt._simd_available():
        pytest.skip("this CPU has no AVX2/F16C: only the scalar loops exist here")
    before = mt.__simd__
    try:
        for dt in (F32, F16, BF16):
            layout = [(k, s, dt, nc) for k, s, d, nc in LAYOUT if d.is_floating_point]
            g = _gen(71)
            a, b = _state(71, layout), _state(72, layout)
            spec = {
                "conv.weight": (
                    (0, torch.randperm(4, generator=g)),
                    (1, torch.randperm(3, generator=g)),
                ),
                "fc.weight": ((1, torch.randperm(16, generator=g)),),
                "bias": ((0, torch.randperm(17, generator=g)),),
            }
            for od in (F32, F16, BF16):
                res = []
                for simd in ("scalar", "avx2"):
                    mt._set_simd(simd)
                    res.append(
                        permuted_interpolate(a, b, [0.3, 1.7], spec, backend="native", out_dtype=od)
                    )
                for xo, yo in zip(*res, strict=True):
                    for k in xo:
                        assert torch.equal(
                            xo[k].view(torch.int16 if od != F32 else torch.int32),
                            yo[k].view(torch.int16 if od != F32 else torch.int32),
                        ), (dt, od, k)
    finally:
        mt._set_simd(before)


def test_permutation_spec_is_refused_by_ops_with_a_pointer_to_spec():
    """ops knows nothing of specs: a PermutationSpec goes to pymerge.spec.aligned_interpolate."""
    from pymerge.testing.models import MLP

    model = MLP(in_dim=3, hidden=(4,), out_dim=2)
    sd = model.state_dict()
    with pytest.raises(
        TypeError, match=r"got PermutationSpec; .*pymerge\.spec\.aligned_interpolate"
    ):
        permuted_interpolate(sd, sd, 0.5, model.spec(), {"fc0": torch.arange(4)})


def _spec_models():
    from pymerge.testing.models import CNN, TinyGPT

    torch.manual_seed(0)
    yield TinyGPT(vocab=11, d_model=8, n_heads=2, n_layers=1, max_len=5, mlp_ratio=2)
    # flatten head: the conv -> linear axis uses `inner` blocks; BN has num_batches_tracked
    yield CNN(in_channels=2, widths=(3, 4), image_size=4, pool="flatten", hidden=6)


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
@pytest.mark.parametrize("model_index", [0, 1])
def test_permuted_with_real_permutation_spec(backend, model_index):
    """The spec-level wrapper pymerge.spec.aligned_interpolate (PermutationSpec + perm: heads,
    packed in_proj segments, inner blocks, through permutation_index_map and the ops' fused
    path): alpha=1 is exactly apply_permutation(spec, perm, B)."""
    import pymerge.spec as spec_mod

    model = list(_spec_models())[model_index]
    spec = model.spec()
    a = {k: v.detach().clone().to(DEV) for k, v in model.state_dict().items()}
    g = _gen(5)
    b = {
        k: (torch.randn(v.shape, generator=g).to(v.dtype).to(DEV) if v.is_floating_point() else v)
        for k, v in a.items()
    }
    perm = spec_mod.random_permutation(spec, b, seed=3)
    pb = spec_mod.apply_permutation(spec, perm, b)
    out = spec_mod.aligned_interpolate(spec, perm, a, b, [0.0, 0.5, 1.0], backend=backend)
    for k in a:
        assert torch.equal(out[0][k], a[k]), k
        assert torch.equal(out[2][k], pb[k] if a[k].is_floating_point() else a[k]), k
        if a[k].is_floating_point():
            ref = 0.5 * a[k].double() + 0.5 * pb[k].double()
            assert torch.allclose(out[1][k].double(), ref, rtol=1e-5, atol=1e-6), k


def test_permuted_errors():
    a, b = _state(90), _state(91)
    p5 = torch.randperm(5)
    cases = [
        ({"lin.weight": ((0, torch.arange(4)),)}, ValueError, r"'lin\.weight' axis 0.*length 4"),
        (
            {"lin.weight": ((1, torch.tensor([0, 1, 2, 3, 4, 5, 5])),)},
            ValueError,
            r"'lin\.weight' axis 1.*not a permutation",
        ),
        (
            {"lin.weight": ((0, torch.tensor([0, 1, 2, 3, 5])),)},
            ValueError,
            r"'lin\.weight' axis 0.*out of range",
        ),
        ({"lin.weight": ((0, torch.tensor([0, 1, 2, 3, -1])),)}, ValueError, "out of range"),
        ({"lin.weight": ((0, p5.float()),)}, TypeError, "integer dtype"),
        ({"lin.weight": ((2, p5),)}, ValueError, r"'lin\.weight'.*axis 2 out of range"),
        ({"nope": ((0, p5),)}, ValueError, "'nope'"),
        ({"mask": ((0, torch.arange(4)),)}, TypeError, "'mask'.*not floating"),
        ({"lin.weight": (("x", p5),)}, TypeError, "not an int"),
        ({"lin.weight": (5,)}, TypeError, "pairs"),
    ]
    for spec, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            permuted_interpolate(a, b, 0.5, spec, backend="torch")
    with pytest.raises(ValueError, match="group 'G'.*not in perm"):
        permuted_interpolate(a, b, 0.5, {"lin.weight": ((0, "G"),)}, {"H": p5})
    with pytest.raises(TypeError, match="group name"):
        permuted_interpolate(a, b, 0.5, {"lin.weight": ((0, p5),)}, {"H": p5})
    with pytest.raises(ValueError, match="empty"):
        permuted_interpolate(a, b, [], {})
    with pytest.raises(TypeError, match="mapping"):
        permuted_interpolate(a, b, 0.5, [("lin.weight", 0, p5)])
    bad = dict(b, tall=torch.zeros(33, 1, dtype=F16))
    with pytest.raises(ValueError, match="key 'tall' has dtype"):
        permuted_interpolate(a, bad, 0.5, {})
    missing = dict(b)
    del missing["conv.weight"]
    with pytest.raises(ValueError, match=r"key .conv\.weight. is in state_a but not in state_b"):
        permuted_interpolate(a, missing, 0.5, {})
    _assert_unchanged([a, b], _snapshot([_state(90), _state(91)]))


def test_ops_names_stay_functions_after_submodule_import():
    """Importing the submodules must not rebind `pymerge.ops.interpolate`/`.correlation`."""
    code = (
        "import pymerge.ops.interpolate, pymerge.ops.correlation, pymerge.align\n"
        "import pymerge, pymerge.ops as ops, types\n"
        "assert not isinstance(ops.interpolate, types.ModuleType)\n"
        "assert not isinstance(ops.correlation, types.ModuleType)\n"
        "assert pymerge.interpolate is ops.interpolate\n"
        "import torch\n"
        "s = {'w': torch.ones(3)}\n"
        "assert torch.equal(ops.interpolate([s], [2.0], backend='torch')['w'], 2 * s['w'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_HERE)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    dtype=st.sampled_from([F32, F16, BF16]),
)
def test_property_permuted_random_axes(shape, data, dtype):
    backends = ["torch"] + (["triton"] if _TRITON_OK else []) + (["native"] if _NATIVE_OK else [])
    seed = data.draw(st.integers(0, 2**16))
    g = _gen(seed)
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), max_size=3))
    spec = {"t": tuple((ax, torch.randperm(shape[ax], generator=g)) for ax in axes)}
    a = {"t": torch.randn(shape, generator=g).to(dtype)}
    b = {"t": torch.randn(shape, generator=g).to(dtype)}
    alpha = data.draw(st.floats(-1.0, 2.0))
    a32 = _f32(alpha)
    ref_b = b["t"]
    for ax, idx in spec["t"]:
        ref_b = ref_b.index_select(ax, idx)
    ref = (1 - a32) * a["t"].double() + a32 * ref_b.double()
    scale = abs(1 - a32) * a["t"].double().abs() + abs(a32) * ref_b.double().abs()
    for be in backends:
        out = permuted_interpolate(a, b, [alpha], spec, backend=be)[0]["t"]
        _assert_close(out, ref, scale, 1, (be, shape, axes))


# ----------------------------------------------------------------------------- codegen


_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pymerge.kernels import interpolate as ki, permuted_interpolate as kp

dt, vec = sys.argv[1], int(sys.argv[2])


def ptx(fn, sig, cx, num_warps, divisible=()):
    names = fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k in divisible}
    sig = {**sig, **{k: "constexpr" for k in cx}}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    p = k.asm["ptx"]
    return [len(re.findall(r"ld\.global(\.\w+)*\.v4", p)),
            len(re.findall(r"st\.global(\.\w+)*\.v4", p))]


i64 = ("delta_ptr", "numel_ptr", "outoff_ptr", "first_ptr", "chunk_ptr")
sig = {"base_ptr": f"*{dt}", "out_ptr": f"*{dt}", "w_ptr": "*fp32", **{k: "*i64" for k in i64}}
ws = ptx(ki._weighted_sum_kernel, sig, {"K": 2, "BLOCK": 4096, "VEC": vec, "VO": vec}, 8)
sig = {"a_base": f"*{dt}", "b_base": f"*{dt}", "out_ptr": f"*{dt}", "alpha_ptr": "*fp32",
       "M": "i32", "out_stride": "i32", "tab_ptr": "*i64", "tile_ptr": "*i64", "map_ptr": "*i64"}
cx = {"NF": 8, "BR": 4, "BC": 512, "SEG": 8192, "VA": vec, "VO": vec}
pl = ptx(kp._perm_lerp_kernel, sig, cx, 4, divisible=("out_stride",))
print(json.dumps({"weighted_sum": ws, "permuted": pl}))
"""


@pytest.mark.skipif(triton_error() is not None, reason="triton missing")
@pytest.mark.parametrize(("dt", "vec"), [("bf16", 8), ("fp32", 4)])
def test_kernels_compile_to_128bit_accesses(dt, vec):
    """Bandwidth needs 16-byte vector loads/stores on the unmasked paths: compile both kernels
    for sm_90 (no GPU needed; in a subprocess, since code generation does not work with
    TRITON_INTERPRET=1 set) and count v4 accesses in the PTX."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, dt, str(vec)],
        env=env,
        cwd=_HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode and ("ptxas" in proc.stderr or "backends" in proc.stderr):
        pytest.skip(f"no sm_90 toolchain in this triton build: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # weighted sum: 4096 elements / 256 threads = 16 per thread; permuted: 4 x 512 / 128 = 16
    per_thread = 16 * (2 if dt == "bf16" else 4) // 16  # 16-byte vectors per tensor per thread
    ld, st = counts["weighted_sum"]
    assert ld >= 2 * per_thread and st >= per_thread, counts  # both inputs and the output
    ld, st = counts["permuted"]
    assert ld >= 2 * per_thread and st >= per_thread, counts  # A, contiguous-row B, output


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=4),
    K=st.integers(1, 4),
    dtype=st.sampled_from([F32, F16, BF16]),
    data=st.data(),
)
def test_property_interpolate_random_dicts(shapes, K, dtype, data):
    backends = ["torch"] + (["triton"] if _TRITON_OK else []) + (["native"] if _NATIVE_OK else [])
    g = _gen(data.draw(st.integers(0, 2**16)))
    weights = data.draw(st.lists(st.floats(-2.0, 2.0), min_size=K, max_size=K))
    states = [
        {f"p{i}": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
        for _ in range(K)
    ]
    for be in backends:
        out = interpolate(states, weights, backend=be)
        for k in states[0]:
            xs = [s[k].double() for s in states]
            w32 = [_f32(w) for w in weights]
            ref = sum(w * x for w, x in zip(w32, xs, strict=True))
            scale = sum(abs(w) * x.abs() for w, x in zip(w32, xs, strict=True))
            _assert_close(out[k], ref, scale, 1 if be in _ONE_ROUNDING else K, (be, k, weights))


@pytest.mark.skipif(not _NATIVE_OK, reason="pymerge._multi_tensor not built")
def test_auto_backend_cost_model_on_cpu(monkeypatch):
    """auto: torch where it needs one op per tensor, the C++ loops from three, and for two
    only on dicts of larger tensors; the results agree either way."""
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    calls = []
    for name in ("_interp_native", "_interp_torch"):
        real = getattr(front, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(front, name, spy)
    g = _gen(40)
    small = [{"w": torch.randn(20, 30, generator=g), "b": torch.randn(30, generator=g)}] * 3
    big = [{"w": torch.randn(200, 100, generator=g)} for _ in range(3)]
    small_bf16 = [{k: v.to(BF16) for k, v in sd.items()} for sd in small]
    cases = [
        (small[:1], [0.5], None, "_interp_torch"),  # K = 1: one multiply
        (small[:2], [0.25, 0.75], None, "_interp_torch"),  # a lerp
        (small[:2], [0.25, 0.5], None, "_interp_torch"),  # two ops, small tensors
        (small, [0.2, -0.7, 1.3], None, "_interp_native"),  # three ops
        (small, [1.0, 0.5, 0.5], None, "_interp_torch"),  # task arithmetic, small tensors
        (big, [1.0, 0.5, 0.5], None, "_interp_native"),  # task arithmetic, larger tensors
        (small[:2], [0.25, 0.75], torch.bfloat16, "_interp_torch"),  # lerp + cast, small
        (small_bf16[:2], [0.25, 0.75], None, "_interp_torch"),  # a bf16 lerp: one op
        # bf16 sums of several terms: fp32 accumulators (an upcast and a rounding more)
        (small_bf16, [1.0, 0.5, 0.5], None, "_interp_native"),
        (small_bf16[:2], [1.0, 0.5], None, "_interp_native"),
        (big[:2], [0.25, 0.75], torch.bfloat16, "_interp_native"),  # lerp + cast, larger
    ]
    for states, w, od, expect in cases:
        calls.clear()
        out = interpolate(states, w, out_dtype=od)
        assert calls == [expect], (w, od, calls)
        ref = interpolate(states, w, out_dtype=od, backend="torch")
        for k in out:
            assert torch.allclose(out[k].float(), ref[k].float(), rtol=1e-2, atol=1e-2), k


@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_lazily_negated_inputs_read_as_their_values(backend):
    """torch._neg_view tensors (memory holds -x, the negation bit says so): fast paths that
    read raw memory must resolve the bit, not read -x."""
    g = _gen(41)
    plain = [{"w": torch.randn(4, 6, generator=g).to(DEV)} for _ in range(3)]
    lazy = [{"w": torch._neg_view(-s["w"])} for s in plain]
    assert lazy[0]["w"].is_neg() and torch.equal(lazy[0]["w"], plain[0]["w"])
    w = [0.2, -0.7, 1.3]
    out = interpolate(lazy, w, backend=backend)
    ref = interpolate(plain, w, backend=backend)
    assert torch.equal(out["w"], ref["w"])
    perm = {"w": ((1, torch.randperm(6, generator=g).to(DEV)),)}
    out = permuted_interpolate(lazy[0], lazy[1], [0.3], perm, backend=backend)[0]
    ref = permuted_interpolate(plain[0], plain[1], [0.3], perm, backend=backend)[0]
    assert torch.equal(out["w"], ref["w"])


def test_auto_without_the_cpp_loops_uses_torch(monkeypatch):
    """A build without pymerge._multi_tensor: auto falls back to torch for every dtype
    (float16 included, whose cost model asks which loop set the module picked)."""
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    monkeypatch.setattr(front, "native_multi_tensor", lambda: None)
    g = _gen(42)
    for dt in (F16, BF16, F32):
        states = [{"w": torch.randn(5, 7, generator=g).to(dt)} for _ in range(3)]
        out = interpolate(states, [0.2, -0.7, 1.3])
        ref = interpolate(states, [0.2, -0.7, 1.3], backend="torch")
        assert torch.equal(out["w"], ref["w"]), dt
        perm = {"w": ((1, torch.randperm(7, generator=g)),)}
        out = permuted_interpolate(states[0], states[1], 0.3, perm)
        ref = permuted_interpolate(states[0], states[1], 0.3, perm, backend="torch")
        assert torch.equal(out["w"], ref["w"]), dt


def test_the_one_lru_cache_helper():
    """pymerge._util.cache.LRUCache: item limit, cost budget (the newest entry stays even
    when it alone is over budget), recency on get, replacement, clear."""
    from pymerge._util.cache import LRUCache

    c = LRUCache(3)
    for k in "abcd":
        c.put(k, k.upper())
    assert len(c) == 3 and "a" not in c and c.get("a", 0) == 0
    assert c.get("b") == "B"  # b is now the most recent: c goes next
    c.put("e", "E")
    assert "c" not in c and {"b", "d", "e"} == {k for k in "bcde" if k in c}
    sized = LRUCache(100, max_cost=10, cost=len)
    sized.put(1, "xxxx")
    sized.put(2, "yyyy")
    sized.put(1, "zz")  # replacing an entry re-counts its cost
    assert sized.total_cost == 6 and sized.get(2) == "yyyy"
    sized.put(3, "wwwww")  # 11 > 10: the least recent (1) goes
    assert 1 not in sized and sized.total_cost == 9
    sized.put(4, "v" * 50)  # over budget alone: kept, everything else dropped
    assert len(sized) == 1 and sized.get(4) is not None and sized.total_cost == 50
    sized.clear()
    assert len(sized) == 0 and sized.total_cost == 0
    with pytest.raises(ValueError, match="max_items"):
        LRUCache(0)
    with pytest.raises(ValueError, match="cost"):
        LRUCache(2, max_cost=5)
    # the ops' caches are all of this one kind, and clear_caches empties them
    from pymerge.ops import _perm_axes

    caches = [front._FLOATS, front._MAPS, _perm_axes._INDEX, *front._KERNEL_TABLES.values()]
    assert all(isinstance(x, LRUCache) for x in caches)
    a, b, spec, _ = _perm_setup(81)
    permuted_interpolate(a, b, 0.5, spec)
    assert len(_perm_axes._INDEX) > 0
    front.clear_caches()
    assert all(len(x) == 0 for x in caches)
