"""pymerge.ops.merge_task_vectors: the formulas (a float64 reference written from them), the
three backends against each other, the random stream's C++ and Triton twins, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pymerge._backend import backends, native_task_vectors, triton_error
from pymerge.ops import TaskVectorParams, merge_task_vector_tensor, merge_task_vectors, rng
from pymerge.ops.task_vectors import della_view

TV = native_task_vectors()
needs_native = pytest.mark.skipif(TV is None, reason="pymerge._task_vectors is not built")
needs_triton = pytest.mark.skipif(triton_error() is not None, reason="triton does not import")

METHODS = [  # (sparsify, consensus)
    ("none", False),
    ("magnitude", True),
    ("magnitude", False),
    ("random", False),
    ("random", True),
    ("magnitude_outliers", False),
    ("magnitude_outliers", True),
    ("della_magprune", True),
    ("della_magprune", False),
]


# ----------------------------------------------------------------------------- reference


def _ref_keep(tau: torch.Tensor, k: int, K: int, p, sparsify, seed, key) -> torch.Tensor:
    """The keep mask from the definitions: sorts (stable: ties by position) and draws."""
    n = tau.numel()
    d = p.densities[k]
    flat = tau.reshape(-1)
    if sparsify == "none" or d >= 1 or n == 0:
        return torch.ones(n, dtype=torch.float64)
    if sparsify in ("magnitude", "magnitude_outliers"):
        order = torch.sort(flat.abs(), stable=True).indices  # ascending (|tau|, position)
        if sparsify == "magnitude":
            lo, hi = n - max(1, int(d * n)), n
        else:
            target, top = int(d * n), int(p.gammas[k] * n)
            lo = max(0, n - target - top)
            hi = lo + target
        keep = torch.zeros(n, dtype=torch.float64)
        keep[order[max(lo, 0) : hi]] = 1
        return keep
    u = rng.uniform(seed, key, K * n)[k * n : (k + 1) * n].double()
    if sparsify == "random":
        return (u < np.float32(d)).double()
    A, C, B = della_view(tau.shape)
    if C == 1:
        return (u < np.float32(d)).double()
    mag = flat.abs().view(A, C, B)
    order = torch.sort(mag, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(C).view(1, C, 1).expand_as(order))
    e = p.epsilons[k]
    prob = (d - e) + rank.double().reshape(-1) / (C - 1) * 2 * e
    return (u < prob).double()


def reference(states, base, p, sparsify, consensus, seed=0) -> dict[str, torch.Tensor]:
    """From the formulas (PAPERS.md / mergekit's generalized task arithmetic), in float64;
    for fp32/fp16/bf16 inputs the weighted task vectors and the sign election's sum are
    formed in float32 as the documented arithmetic says (a sum near zero may elect either
    sign otherwise), the rest in float64."""
    out = {}
    K = len(states)
    for key, b in base.items():
        b64 = b.double()
        cdt = torch.float64 if b.dtype == torch.float64 else torch.float32
        deltas = []
        for k, s in enumerate(states):
            tau = (s[key].double() - b64).to(b.dtype).double().reshape(-1)  # storage rounding
            keep = _ref_keep(tau.view(b.shape), k, K, p, sparsify, seed, key)
            m = tau * keep
            if p.rescale and sparsify != "none" and p.densities[k] < 1:
                before, after = float(tau.abs().sum()), float(m.abs().sum())
                if not (before < 1e-7 or after < 1e-7):
                    m = (m.to(cdt) * torch.tensor(before / after, dtype=cdt)).double()
            deltas.append((m.to(cdt) * torch.tensor(p.weights[k], dtype=cdt)).double())
        D = torch.stack(deltas)
        if consensus:
            total = torch.zeros(D.shape[1], dtype=cdt)
            for d in deltas:
                total = total + d.to(cdt)
            up = total >= 0
            on = torch.where(up, D > 0, D < 0).double()
            mixed = (D * on).sum(0)
            div = (torch.tensor(p.weights, dtype=torch.float64)[:, None] * on).sum(0)
            div[div == 0] = 1
        else:
            mixed = D.sum(0)
            ws = math.fsum(p.weights)
            div = 1.0 if abs(ws) < 1e-8 else ws
        if p.normalize:
            mixed = mixed / div
        out[key] = (b64.reshape(-1) + p.lam * mixed).view(b.shape)
    return out


def awkward(dtype, seed=0, scale=0.05):
    """A base and 3 fine-tunes: 0-d, 1-d, 2-d with odd sizes, 4-d (DELLA's [A, C, B] view),
    a non-contiguous (transposed) entry and an integer buffer."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g)

    base = {
        "scalar": r(),
        "bias": r(7),
        "w": r(37, 29),
        "conv": r(6, 5, 3, 2),
        "t": r(23, 31).t(),  # non-contiguous
        "count": torch.tensor(3),
    }
    tunes = []
    for _ in range(3):
        tunes.append(
            {
                k: v if not v.is_floating_point() else v + scale * r(*v.shape)
                for k, v in base.items()
            }
        )
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    cast["t"] = base["t"].t().contiguous().to(dtype).t()
    states = []
    for s in tunes:
        c = {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}
        c["t"] = s["t"].t().contiguous().to(dtype).t()
        states.append(c)
    return states, cast


PARAMS = TaskVectorParams.make(
    3,
    weight=[0.7, 1.0, -0.4],
    density=[0.3, 0.6, 0.9],
    gamma=[0.05, 0.1, 0.2],
    epsilon=[0.1, 0.05, 0.05],
    lam=0.9,
    normalize=True,
)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("sparsify,consensus", METHODS)
def test_float64_matches_the_formulas(sparsify, consensus, rescale):
    states, base = awkward(torch.float64)
    p = TaskVectorParams(**{**PARAMS.__dict__, "rescale": rescale})
    got = merge_task_vectors(states, base, p, sparsify=sparsify, consensus=consensus, seed=5)
    ref = reference(
        [{k: v for k, v in s.items() if k != "count"} for s in states],
        {k: v for k, v in base.items() if k != "count"},
        p,
        sparsify,
        consensus,
        seed=5,
    )
    for k, r in ref.items():
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], r, rtol=1e-6, atol=1e-6, msg=k)
    assert torch.equal(got["count"], base["count"])


def _backends():
    out = ["torch"]
    if TV is not None:
        out.append("native")
    if triton_error() is None:
        out.append("triton")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsify,consensus", METHODS)
def test_every_backend_matches_the_formulas_in_half_and_single(dtype, sparsify, consensus):
    states, base = awkward(dtype, seed=1)
    floats = [k for k, v in base.items() if v.is_floating_point()]
    ref = reference(
        [{k: s[k] for k in floats} for s in states],
        {k: base[k] for k in floats},
        PARAMS,
        sparsify,
        consensus,
        seed=2,
    )
    results = {}
    for be in _backends():
        got = merge_task_vectors(
            states, base, PARAMS, sparsify=sparsify, consensus=consensus, seed=2, backend=be
        )
        results[be] = got
        for k in floats:
            o, r = got[k].double(), ref[k]
            scale = max(1.0, float(r.abs().max()))
            tol = 2 * torch.finfo(dtype).eps * scale
            assert float((o - r).abs().max()) <= tol, (be, k, float((o - r).abs().max()))
    for be, got in results.items():  # the same arithmetic: the same bits
        for k in floats:
            assert torch.equal(got[k], results["torch"][k]), (be, k)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_large_tensors_windows_histograms_and_dense_ties(dtype):
    """Tensors large enough for the sampled windows (fp16/bf16), the full histograms (fp32),
    several chunks (tie ordinals carried across them), quantised task vectors (dense ties at
    the threshold) and an all-zero task vector: the torch path's exact masks."""
    g = torch.Generator().manual_seed(3)
    n = 2 * TV._chunk + 12345
    b = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(b.float() + 1e-3 * torch.randn(n, generator=g)).to(dtype) for _ in range(2)]
    xs.append(b.clone())  # zero task vector
    base = {"big": b, "mid": b[:300_001].clone()}
    states = [{"big": x, "mid": x[:300_001].clone()} for x in xs]
    for sparsify, consensus in (("magnitude", True), ("magnitude_outliers", False)):
        p = TaskVectorParams.make(3, density=[0.2, 0.55, 0.3], gamma=[0.01, 0.2, 0.0])
        a = merge_task_vectors(
            states, base, p, sparsify=sparsify, consensus=consensus, backend="torch"
        )
        c = merge_task_vectors(
            states, base, p, sparsify=sparsify, consensus=consensus, backend="native"
        )
        for k in a:
            assert torch.equal(a[k], c[k]), (sparsify, k, int((a[k] != c[k]).sum()))


@needs_native
def test_native_window_that_misses_falls_back_to_exact_histograms():
    """Sampled positions hold tiny task vectors, all others large ones: the sampled window
    misses the threshold, and the full histogram pass still selects exactly."""
    n = 600_000
    blocks, length = 256, 128
    sampled = torch.zeros(n, dtype=torch.bool)
    for j in range(blocks):
        s = j * (n - length) // (blocks - 1)
        sampled[s : s + length] = True
    g = torch.Generator().manual_seed(4)
    tau = torch.where(sampled, 1e-4, 1.0) * torch.randn(n, generator=g)
    base = {"w": torch.zeros(n, dtype=torch.bfloat16)}
    states = [{"w": tau.to(torch.bfloat16)}]
    p = TaskVectorParams.make(1, density=0.5)
    a = merge_task_vectors(states, base, p, sparsify="magnitude", consensus=True, backend="torch")
    c = merge_task_vectors(states, base, p, sparsify="magnitude", consensus=True, backend="native")
    assert torch.equal(a["w"], c["w"])
    assert int((c["w"] != 0).sum()) == n // 2


@needs_native
@pytest.mark.parametrize("sparsify,consensus", METHODS)
def test_native_loop_sets_are_bit_identical_and_threads_do_not_matter(sparsify, consensus):
    """scalar, AVX2 and (where the CPU has it) AVX-512 give the same bits, on 1 or 2 threads."""
    available = TV._simd_available()
    if "avx2" not in available:
        pytest.skip("no AVX2 here: only the portable loops exist")
    states, base = awkward(torch.bfloat16, seed=6)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * TV._chunk // 2, generator=g).to(torch.bfloat16)
    base["big"] = big
    for s in states:
        s["big"] = (big.float() + 0.1 * torch.randn(big.shape, generator=g)).to(torch.bfloat16)
    p = TaskVectorParams(**{**PARAMS.__dict__, "rescale": True})
    before = TV.__simd__
    threads = torch.get_num_threads()
    try:
        outs = []
        runs = [("scalar", 1), ("avx2", 1), ("avx2", 2)]
        if "avx512" in available:
            runs += [("avx512", 1), ("avx512", 2)]
        for simd, nt in runs:
            TV._set_simd(simd)
            torch.set_num_threads(nt)
            outs.append(
                merge_task_vectors(
                    states, base, p, sparsify=sparsify, consensus=consensus, backend="native"
                )
            )
    finally:
        TV._set_simd(before)
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for k in o:
            assert torch.equal(o[k], outs[0][k]), k


@needs_native
def test_simd_levels_are_reported_and_bad_ones_refused():
    assert TV.__simd__ in TV._simd_available()
    assert TV._simd_available()[0] == "scalar"
    before = TV.__simd__
    try:
        with pytest.raises(ValueError, match="avx9000"):
            TV._set_simd("avx9000")
        assert TV.__simd__ == before
        for simd in TV._simd_available():
            TV._set_simd(simd)
            assert TV.__simd__ == simd
    finally:
        TV._set_simd(before)


@needs_native
def test_cpp_random_stream_is_the_python_definition():
    for seed, key, off in (
        (0, "", 0),
        (7, "model.layers.3.mlp.up_proj.weight", 12345),
        (2**63 - 1, "ü", 1),
    ):
        out = np.empty(1000, dtype=np.float32)
        TV.uniform(rng.stream_key(seed, key), off, out)
        ref = rng.uniform(seed, key, off + 1000)[off:]
        assert torch.equal(torch.from_numpy(out), ref)


@needs_triton
def test_triton_random_stream_is_the_python_definition():
    """DARE with one model, a zero base and ones: the output is the keep mask u < d, element
    for element, at several densities (so each draw is pinned to within the density grid)."""
    n = 3000
    base = {"w": torch.zeros(n)}
    states = [{"w": torch.ones(n)}]
    u = rng.uniform(11, "w", n)
    for d in (0.1, 0.37, 0.5, 0.83):
        p = TaskVectorParams.make(1, density=d)
        got = merge_task_vectors(states, base, p, sparsify="random", seed=11, backend="triton")
        assert torch.equal(got["w"], (u < d).float())


def test_per_tensor_function_equals_the_whole_state_call():
    states, base = awkward(torch.float32, seed=8)
    p = TaskVectorParams(**{**PARAMS.__dict__, "rescale": True})
    for sparsify, consensus in METHODS:
        whole = merge_task_vectors(states, base, p, sparsify=sparsify, consensus=consensus, seed=1)
        for k, b in base.items():
            if not b.is_floating_point():
                continue
            one = merge_task_vector_tensor(
                [s[k] for s in states],
                b,
                p,
                key=k,
                sparsify=sparsify,
                consensus=consensus,
                seed=1,
            )
            assert torch.equal(one, whole[k]), (sparsify, k)


def test_inputs_are_not_modified_and_outputs_do_not_alias():
    states, base = awkward(torch.bfloat16, seed=9)
    copies = [{k: v.clone() for k, v in s.items()} for s in (*states, base)]
    out = merge_task_vectors(states, base, PARAMS, sparsify="magnitude", consensus=True)
    for s, c in zip((*states, base), copies, strict=True):
        for k in s:
            assert torch.equal(s[k], c[k])
    for k, v in out.items():
        assert v.untyped_storage().data_ptr() != base[k].untyped_storage().data_ptr()


def test_bad_input_is_a_clear_error_before_any_work():
    states, base = awkward(torch.float32)
    p = PARAMS
    with pytest.raises(ValueError, match="needs base"):
        merge_task_vectors(states, None, p)
    with pytest.raises(ValueError, match="states is empty"):
        merge_task_vectors([], base, p)
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        merge_task_vectors(
            states, base, TaskVectorParams.make(3, density=0.0), sparsify="magnitude"
        )
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        merge_task_vectors(states, base, TaskVectorParams.make(3, density=1.5))
    with pytest.raises(ValueError, match="not finite"):
        merge_task_vectors(states, base, TaskVectorParams.make(3, weight=[1, float("nan"), 1]))
    with pytest.raises(ValueError, match="3 models"):
        merge_task_vectors(states, base, TaskVectorParams.make(2))
    with pytest.raises(ValueError, match="epsilon"):
        merge_task_vectors(
            states,
            base,
            TaskVectorParams.make(3, density=0.1, epsilon=0.15),
            sparsify="della_magprune",
        )
    with pytest.raises(ValueError, match="sparsify must be one of"):
        merge_task_vectors(states, base, p, sparsify="topk")
    bad = [dict(s) for s in states]
    bad[1]["w"] = bad[1]["w"][:-1]
    with pytest.raises(ValueError, match="'w'"):
        merge_task_vectors(bad, base, p)


@needs_native
def test_native_module_checks_its_buffers():
    x = torch.zeros(10)
    cap = torch.utils.dlpack.to_dlpack
    args = (
        "none",
        False,
        [1.0],
        [1.0],
        [0.01],
        [0.15],
        [1.0],
        [0],
        [0],
        [0],
        [1],
        [1],
        "float32",
        "float32",
    )
    with pytest.raises(ValueError, match="out has 9 elements"):
        TV.merge([[cap(x)]], [cap(x.clone())], cap(torch.zeros(9)), *args)
    with pytest.raises(ValueError, match="models\\[0\\]\\[0\\] has 11 elements"):
        TV.merge([[cap(torch.zeros(11))]], [cap(x)], cap(torch.zeros(10)), *args)
    with pytest.raises(TypeError, match="float32"):
        TV.merge([[cap(x.double())]], [cap(x)], cap(torch.zeros(10)), *args)
    out = torch.zeros(10)
    with pytest.raises(ValueError, match="overlaps"):
        TV.merge([[cap(out)]], [cap(x)], cap(out), *args)
    with pytest.raises(ValueError, match="threads"):
        TV.merge([[cap(x)]], [cap(x.clone())], cap(torch.zeros(10)), *args, 0)


def test_backends_reports_the_module():
    info = backends()
    assert "task_vectors_native" in info
    assert info["task_vectors_native"].startswith("built" if TV is not None else "missing")
