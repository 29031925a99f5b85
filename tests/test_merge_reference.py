"""The non-task-vector methods against plain float64 references written from the formulas
(../shared/PAPERS.md, mergekit's documented semantics), on random state dicts with awkward
shapes: 0-d, 1-d, 3-d, non-contiguous views, fp32/bf16/fp16/fp64.

The references are NumPy float64 code written from the formulas, independent of pymerge's
torch code; a method's output in dtype ``d`` must equal the float64 reference rounded to
``d`` up to float32 noise (fp32: 1e-5 relative; half: two units in the last place; fp64:
1e-10, SLERP 1e-12 — the bar is 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pymerge

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _states(k: int, dtype: torch.dtype, *, seed: int = 0, base: bool = False, noise=0.3):
    """K (+1 base) state dicts: 0-d, 1-d, 2-d, 3-d and a non-contiguous view; the models are
    a shared centre plus noise (so angles are moderate, as for fine-tunes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"scalar": (), "vec": (7,), "mat": (5, 3), "cube": (3, 4, 5), "nc": (6, 4)}
    centre = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}

    def one() -> dict[str, torch.Tensor]:
        sd = {}
        for n, c in centre.items():
            x = (c + noise * torch.randn(c.shape, generator=g, dtype=torch.float64)).to(dtype)
            sd[n] = x.t() if n == "nc" else x  # a transposed view: not contiguous
        return sd

    states = [one() for _ in range(k)]
    assert not states[0]["nc"].is_contiguous()
    return (states, one()) if base else (states, None)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _close(out: dict, ref: dict[str, np.ndarray], dtype: torch.dtype, *, f64_tol=1e-10):
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == dtype and o.shape == r.shape, (k, o.dtype, o.shape, r.shape)
        rt = torch.from_numpy(np.ascontiguousarray(r)).to(dtype).double()
        od = o.double()
        if dtype == torch.float64:
            tol = f64_tol * (1 + rt.abs())
        elif dtype == torch.float32:
            tol = 1e-5 * (1 + rt.abs())
        else:
            tol = 2 * torch.finfo(dtype).eps * rt.abs() + 1e-4
        bad = (od - rt).abs() > tol
        assert not bad.any(), (k, float((od - rt).abs().max()))


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------- references


def ref_linear(xs, w, normalize=True):
    acc = sum(wi * x for wi, x in zip(w, xs, strict=True))
    return acc / sum(w) if normalize else acc


def ref_slerp(t, a, b, threshold=0.9995):
    fa, fb = _flat(a), _flat(b)
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    cos = float(np.clip(fa @ fb / ((na if na > 1e-8 else 1) * (nb if nb > 1e-8 else 1)), -1, 1))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def _slerp_rows(t, a, b):
    """SLERP of every row (last axis) of 2-d arrays."""
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        cos = float(
            np.clip(x @ y / (max(np.linalg.norm(x), 1e-7) * max(np.linalg.norm(y), 1e-7)), -1, 1)
        )
        if 1 - cos * cos <= 1e-16:
            out[i] = (1 - t) * x + t * y
        else:
            th = math.acos(cos)
            out[i] = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return out


def ref_nuslerp(a, b, w, base=None, row_wise=False, flatten=True):
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if flatten or a.ndim == 0:
        out = _slerp_rows(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
    elif row_wise:  # vectors along axis 0
        am, bm = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)
        s = am.shape
        out = _slerp_rows(t, am.reshape(-1, s[-1]), bm.reshape(-1, s[-1]))
        out = np.moveaxis(out.reshape(s), -1, 0)
    else:
        out = _slerp_rows(t, a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])).reshape(shape)
    return out if base is None else out + base


def ref_multislerp(xs, w, base=None, eps=1e-8):
    if base is not None:
        xs = [x - base for x in xs]
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    vs = [_flat(x) for x in xs]
    norms = [np.linalg.norm(v) for v in vs]
    us = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    m = sum(wi * u for wi, u in zip(w, us, strict=True))
    m = m / np.linalg.norm(m)
    tan = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, us, strict=True))
    tn = np.linalg.norm(tan) + eps
    out = (m * math.cos(tn) + tan * math.sin(tn) / tn) * sum(
        wi * n for wi, n in zip(w, norms, strict=True)
    )
    out = out.reshape(xs[0].shape)
    return out if base is None else out + base


def ref_model_stock(base, xs, filter_wise=False):
    k = len(xs)
    if filter_wise and base.ndim >= 1:
        b2 = base.reshape(1, -1) if base.ndim == 1 else base.reshape(-1, base.shape[-1])
        x2 = [x.reshape(b2.shape) for x in xs]
    else:
        b2 = base.reshape(1, -1)
        x2 = [x.reshape(1, -1) for x in xs]
    taus = [x - b2 for x in x2]
    out = np.empty_like(b2)
    for r in range(b2.shape[0]):
        cs = []
        for i in range(k):
            for j in range(i + 1, k):
                a, b = taus[i][r], taus[j][r]
                cs.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
        c = float(np.mean(cs))
        t = 0.0 if abs(1 + (k - 1) * c) < 1e-6 else k * c / (1 + (k - 1) * c)
        out[r] = t * np.mean([x[r] for x in x2], axis=0) + (1 - t) * b2[r]
    return out.reshape(base.shape)


def ref_sce(base, xs, select_topk=1.0):
    taus = np.stack([_flat(x - base) for x in xs])
    if select_topk < 1:
        var = taus.var(axis=0)
        k = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.shape, dtype=bool)
        if k:
            keep[np.argsort(-np.abs(var), kind="stable")[:k]] = True
        taus = taus * keep
    w = (taus**2).mean(axis=1)
    w = np.full_like(w, 1 / len(w)) if abs(w.sum()) < 1e-6 else w / w.sum()
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    num = sum(w[i] * agree[i] * taus[i] for i in range(len(xs)))
    den = np.maximum(sum(w[i] * agree[i] for i in range(len(xs))), 1e-6)
    return base + (num / den).reshape(base.shape)


def ref_nearswap(t, base, other):
    w = np.clip(t / np.maximum(np.abs(base - other), 1e-6), 0, 1)
    return w * other + (1 - w) * base


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype):
    states, _ = _states(3, dtype)
    w = [0.2, 1.3, -0.4]
    for normalize in (True, False):
        out = pymerge.merge("linear", states, weights=w, normalize=normalize)
        ref = {k: ref_linear([_np(s[k]) for s in states], w, normalize) for k in states[0]}
        _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp(dtype):
    states, _ = _states(2, dtype, noise=1.0)
    for t in (0.0, 0.3, 0.5, 1.0, 1.4):
        out = pymerge.merge("slerp", states, t=t)
        ref = {k: ref_slerp(t, _np(states[0][k]), _np(states[1][k])) for k in states[0]}
        _close(out, ref, dtype, f64_tol=1e-12)


def test_slerp_formula_to_1e6_in_float64():
    """The bar: SLERP equals sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b to 1e-6 (float64), and
    keeps the norm of unit inputs; colinear pairs lerp."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(33, 17, generator=g, dtype=torch.float64)
    b = torch.randn(33, 17, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    th = torch.acos((a * b).sum())
    for t in (0.1, 0.5, 0.9):
        out = pymerge.merge("slerp", [{"w": a}, {"w": b}], t=t)["w"]
        want = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)
        assert (out - want).abs().max() < 1e-6
        assert abs(float(out.norm()) - 1) < 1e-12
    out = pymerge.merge("slerp", [{"w": a}, {"w": 2 * a}], t=0.25)["w"]
    assert torch.allclose(out, 1.25 * a, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["flatten", "rows", "row_wise", "base"])
def test_nuslerp(dtype, mode):
    states, base = _states(2, dtype, base=mode == "base", noise=1.0)
    w = [1.0, 3.0]
    kw = {
        "flatten": {},
        "rows": {"nuslerp_flatten": False},
        "row_wise": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "base": {"base": base},
    }[mode]
    out = pymerge.merge("nuslerp", states, weights=w, **kw)
    ref = {
        k: ref_nuslerp(
            _np(states[0][k]),
            _np(states[1][k]),
            w,
            base=None if base is None else _np(base[k]),
            row_wise=mode == "row_wise",
            flatten=mode in ("flatten", "base"),
        )
        for k in states[0]
    }
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(dtype, with_base):
    states, base = _states(3, dtype, base=with_base, noise=0.8)
    w = [0.2, 0.5, 0.3]
    out = pymerge.merge("multislerp", states, weights=w, base=base)
    ref = {
        k: ref_multislerp([_np(s[k]) for s in states], w, None if base is None else _np(base[k]))
        for k in states[0]
    }
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_karcher_is_the_riemannian_mean(dtype):
    """Independent of the iteration: at pymerge's result m (run to convergence) the weighted
    log maps of the unit tensors sum to zero (first-order optimality of Σ α d(m, u_i)²), and
    the norm is the weighted mean of the norms."""
    states, _ = _states(4, dtype, noise=0.8)
    w = [1.0, 2.0, 0.5, 1.5]
    out = pymerge.merge("karcher", states, weights=w, max_iter=500, tol=1e-12)
    alpha = np.asarray(w) / sum(w)
    for k in states[0]:
        xs = [_flat(_np(s[k])) for s in states]
        m = _flat(_np(out[k]))
        scale = sum(a * np.linalg.norm(x) for a, x in zip(alpha, xs, strict=True))
        assert abs(np.linalg.norm(m) - scale) <= 1e-5 * scale
        if xs[0].size == 1:
            continue  # on the 0-sphere the mean is a sign
        m = m / np.linalg.norm(m)
        grad = np.zeros_like(m)
        for a, x in zip(alpha, xs, strict=True):
            u = x / np.linalg.norm(x)
            c = float(np.clip(m @ u, -1, 1))
            th = math.acos(c)
            if th > 1e-12:
                grad += a * th / math.sin(th) * (u - c * m)
        assert np.linalg.norm(grad) < (1e-9 if dtype == torch.float64 else 2e-5), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_karcher_half_rounds_the_float32_result(dtype):
    states, _ = _states(3, dtype, noise=0.8)
    out = pymerge.merge("karcher", states)
    up = pymerge.merge("karcher", [{k: v.float() for k, v in s.items()} for s in states])
    for k in out:
        assert torch.equal(out[k], up[k].to(dtype)), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(dtype, filter_wise):
    states, base = _states(3, dtype, base=True)
    out = pymerge.merge("model_stock", states, base=base, filter_wise=filter_wise)
    ref = {
        k: ref_model_stock(_np(base[k]), [_np(s[k]) for s in states], filter_wise)
        for k in states[0]
    }
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce(dtype, select_topk):
    states, base = _states(3, dtype, base=True)
    out = pymerge.merge("sce", states, base=base, select_topk=select_topk)
    ref = {k: ref_sce(_np(base[k]), [_np(s[k]) for s in states], select_topk) for k in states[0]}
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearswap(dtype):
    states, base = _states(1, dtype, base=True)
    for t in (0.05, 0.3, 2.0):
        out = pymerge.merge("nearswap", states, base=base, t=t)
        ref = {k: ref_nearswap(t, _np(base[k]), _np(states[0][k])) for k in states[0]}
        _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_passthrough(dtype):
    states, _ = _states(1, dtype)
    out = pymerge.merge("passthrough", states)
    for k in out:
        assert torch.equal(out[k], states[0][k])
    out = pymerge.merge(
        "passthrough", states, scale=[[{"filter": "mat", "value": 0.0}, {"value": 2}]]
    )
    ref = {k: _np(states[0][k]) * (0.0 if k == "mat" else 2.0) for k in states[0]}
    _close(out, ref, dtype)


MINE = {
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "sce",
    "nearswap",
    "passthrough",
}


def test_the_methods_are_registered_with_their_references():
    infos = {m.name: m for m in pymerge.merge_methods()}
    assert MINE <= set(infos)
    for name in MINE:
        assert "mergekit" in infos[name].reference
        assert infos[name].doc
