"""The model zoo (issue 12): tiny random timm, Hugging Face transformers and
torchvision-structured models, each checked end to end:

- ``spec_from_model`` traces it (with the front stated in ``test_zoo_models.zoo()``) and its
  self-check passes;
- the fraction of parameters left unpermuted is at most the stated per-model figure;
- a random permutation keeps the function (float64, every 1-D state entry re-randomised
  first, max abs difference <= 1e-9 relative to the output scale);
- weight matching between two random inits runs and the permuted B computes B's function.

Hugging Face's RMSNorm casts to float32 inside (so does the self-check's float64 run, which
therefore allows 1e-5); for the 1e-9 comparison here the RMSNorm modules of the compared
copies compute the same formula in float64 (the spec is traced from the model as shipped).

``python test_zoo.py`` prints the coverage table of ``docs/architectures.md`` (with timings);
``python test_zoo.py --time`` times tracing 12-layer models (``bench/RESULTS.md``).
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pymerge.align import weight_matching
from pymerge.spec import PermutationSpec, apply_permutation, random_permutation, spec_from_model
from pymerge.spec.tracing.check import perturb_state

sys.path.insert(0, str(Path(__file__).parent))
import test_zoo_models as Z  # noqa: E402

# tiny models run fastest (and far less load-sensitive) on one torch thread
pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = {m.name: m for m in Z.zoo()}
_MISSING = {
    "timm": "timm is not installed (a test-only dependency: pip install 'pymerge[test]')",
    "transformers": "transformers is not installed (a test-only dependency: pip install "
    "'pymerge[test]')",
}


def _available(source: str) -> bool:
    if source == "timm":
        return Z.import_timm() is not None
    if source == "transformers":
        return Z.import_transformers() is not None
    return True


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    zm = ZOO[name]
    if not _available(zm.source):
        pytest.skip(_MISSING[zm.source])
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = zm.build().eval()
    torch.manual_seed(100)
    return model, zm.inputs()


def unpermuted_fraction(spec: PermutationSpec, model: nn.Module) -> float:
    """Parameters (by count, tied ones once) no group permutes, over all parameters."""
    total = left = 0
    for key, p in model.named_parameters():
        total += p.numel()
        if key not in spec.axes_to_perm:
            left += p.numel()
    return left / total


def _rms_f64(self: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RMSNorm formula without its float32 cast."""
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


def _float64(model: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(model).double().eval()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rms_f64, m)
    perturb_state(model, seed)
    return model


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"]  # type: ignore[index]


def max_rel_diff(model: nn.Module, state_a: dict, state_b: dict, inputs: tuple) -> float:
    """Max abs difference of ``model``'s outputs under two states, over the output scale."""
    xs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    other = copy.deepcopy(model)
    model.load_state_dict(state_a)
    other.load_state_dict(state_b)
    with torch.no_grad():
        a, b = _logits(model(*xs)), _logits(other(*xs))
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


@functools.cache
def traced(name: str) -> tuple[nn.Module, tuple, PermutationSpec, str, float]:
    """The model (seed 0), its inputs, its spec, the front and the seconds (once per worker:
    the tests below only read them)."""
    model, inputs = build(name)
    return (model, inputs, *trace(name, model, inputs))


def trace(name: str, model: nn.Module, inputs: tuple) -> tuple[PermutationSpec, str, float]:
    """The spec (self-check on), the front that produced it and the seconds it took."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = spec_from_model(model, inputs, tracer=ZOO[name].tracer)
    seconds = time.perf_counter() - t0
    front = "export" if any(r.startswith("traced with torch.export") for r in spec.report) else "fx"
    return spec, front, seconds


def check_model(name: str) -> dict:
    """Every check of one zoo model; returns the figures of its table row."""
    zm = ZOO[name]
    model, inputs, spec, front, seconds = traced(name)
    assert front == zm.traced_by, spec.report[:1]
    frac = unpermuted_fraction(spec, model)
    assert frac <= zm.max_unpermuted, (frac, [r for r in spec.report if "frozen" in r][:5])
    assert not [r for r in spec.report if r.startswith("unsupported")], spec.report
    # a random permutation keeps the function
    m64 = _float64(model, seed=3)
    sd = {k: v.clone() for k, v in m64.state_dict().items()}
    perm = random_permutation(spec, sd, seed=3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    same = max_rel_diff(m64, sd, apply_permutation(spec, perm, sd), inputs)
    assert same <= 1e-9, same
    # weight matching between two random inits preserves B's function
    model_b, _ = build(name, seed=1)
    b64 = _float64(model_b, seed=4)
    sa, sb = m64.state_dict(), {k: v.clone() for k, v in b64.state_dict().items()}
    result = weight_matching(spec, sa, sb, max_iter=20)
    kept = max_rel_diff(b64, sb, apply_permutation(spec, result.perm, sb), inputs)
    assert kept <= 1e-9, kept
    hist = result.history.objective
    assert hist[-1] >= hist[0] - 1e-9 * abs(hist[0])
    return {
        "front": front,
        "seconds": seconds,
        "unpermuted": frac,
        "same": same,
        "wm": kept,
        "groups": len(spec.groups()),
    }


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name: str) -> None:
    check_model(name)


# ----------------------------------------------------------------- family specifics
def _refs(spec: PermutationSpec, group: str) -> set[tuple]:
    return {(r.param, r.axis, r.start, r.stop, r.inner) for r in spec.perm_to_axes[group]}


def _group(spec: PermutationSpec, param: str, axis: int) -> str:
    (g,) = {g for r, g in spec.axes_to_perm[param] if r.axis == axis}
    return g


def test_gpt2_conv1d_layout_tied_embeddings_learned_positions() -> None:
    model, x, spec, _, _ = traced("hf_gpt2")
    stream = _group(spec, "transformer.wte.weight", 1)
    refs = _refs(spec, stream)
    assert ("lm_head.weight", 1, 0, None, 1) in refs  # tied: follows its twin
    assert ("transformer.wpe.weight", 1, 0, None, 1) in refs
    assert ("transformer.h.0.attn.c_attn.weight", 0, 0, None, 1) in refs  # Conv1D: [in, out]
    fc = _group(spec, "transformer.h.0.mlp.c_fc.weight", 1)
    assert ("transformer.h.0.mlp.c_proj.weight", 0, 0, None, 1) in _refs(spec, fc)
    assert len(spec.heads) == 2  # per layer: q/k and v/proj with one head permutation


def test_llama_gqa_heads_move_with_their_query_groups() -> None:
    model, x, spec, _, _ = traced("hf_llama")
    g = _group(spec, "model.layers.0.self_attn.k_proj.weight", 0)
    p = "model.layers.0.self_attn."
    assert _refs(spec, g) == {
        (p + "q_proj.weight", 0, 0, None, 16),  # 2 query heads x 8 units per kv head
        (p + "k_proj.weight", 0, 0, None, 8),
        (p + "v_proj.weight", 0, 0, None, 8),
        (p + "o_proj.weight", 1, 0, None, 16),
    }
    stream = _group(spec, "model.embed_tokens.weight", 1)
    assert ("model.norm.weight", 0, 0, None, 1) in _refs(spec, stream)  # RMSNorm


def test_vit_class_token_joins_the_stream() -> None:
    model, x, spec, _, _ = traced("timm_vit")
    stream = _group(spec, "patch_embed.proj.weight", 0)
    assert {("cls_token", 2, 0, None, 1), ("pos_embed", 2, 0, None, 1)} <= _refs(spec, stream)


def test_convnext_layernorm2d_joins_the_channels() -> None:
    model, x, spec, _, _ = traced("timm_convnext_atto")
    stream = _group(spec, "stem.0.weight", 0)
    assert ("stem.1.weight", 0, 0, None, 1) in _refs(spec, stream)  # LayerNorm2d
    assert ("stages.0.blocks.0.gamma", 0, 0, None, 1) in _refs(spec, stream)  # layer scale


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "hf_mistral", "hf_qwen2"])
def test_traced_equals_the_config_spec(name: str) -> None:
    """Two independent derivations agree: the traced spec and ``hf_spec`` (from the config
    and tensor names alone) have the same groups and head structures."""
    hf = pytest.importorskip("pymerge.spec.hf")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_trace as T

    model, _, spec, _, _ = traced(name)
    assert T._canon(spec) == T._canon(hf.hf_spec(model.config, keys=model.state_dict()))


def test_hf_cache_in_the_outputs_is_rejected_with_a_way_out() -> None:
    """A model built with its cache on returns a cache object ``torch.export`` cannot
    flatten: a clear error naming the fix; the dict inputs it suggests trace."""
    tf = Z.import_transformers()
    if tf is None:
        pytest.skip(_MISSING["transformers"])
    torch.manual_seed(0)
    cfg = {k: v for k, v in Z._LLAMA_LIKE.items() if k != "use_cache"}
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="use_cache=False"):
        spec_from_model(model, ids)
    spec = spec_from_model(model, {"input_ids": ids, "use_cache": False})
    assert unpermuted_fraction(spec, model) < 0.01


def twelve_layers() -> dict[str, tuple]:
    """12-layer models for the tracing-time bar: (builder, inputs, tracer)."""
    timm, tf = Z.import_timm(), Z.import_transformers()
    llama = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=12)
    return {
        "timm ViT (fx)": (
            lambda: timm.create_model(
                "vit_tiny_patch16_224",
                img_size=32,
                patch_size=8,
                embed_dim=64,
                depth=12,
                num_heads=4,
                num_classes=10,
            ),
            (torch.randn(2, 3, 32, 32),),
        ),
        "HF GPT-2 (export)": (
            lambda: tf.GPT2LMHeadModel(
                tf.GPT2Config(
                    vocab_size=64, n_positions=16, n_embd=64, n_layer=12, n_head=4, use_cache=False
                )
            ),
            (torch.randint(0, 64, (2, 8)),),
        ),
        "HF Llama GQA (export)": (
            lambda: tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    **llama, num_attention_heads=4, num_key_value_heads=2, use_cache=False
                )
            ),
            (torch.randint(0, 64, (2, 8)),),
        ),
    }


def time_twelve_layers(repeats: int = 5) -> None:
    """Seconds per ``spec_from_model`` call (self-check on and off): the first call in the
    process (one-time imports and warm-up of torch.fx / torch.export) and the median of
    ``repeats`` more, wall clock and CPU time of this process (one torch thread: on a
    machine shared with other jobs the CPU time is what the call itself costs)."""
    print("| 12-layer model | check | first call, wall / CPU | median of the next 5, wall / CPU |")
    print("| --- | --- | --- | --- |")
    for name, (make, x) in twelve_layers().items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make().eval()
        for check in (True, False):
            times = []
            for _ in range(repeats + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    spec_from_model(model, x, check=check)
                times.append((time.perf_counter() - t0, time.process_time() - c0))
            wall = sorted(t for t, _ in times[1:])[repeats // 2]
            cpu = sorted(c for _, c in times[1:])[repeats // 2]
            first = f"{times[0][0]:.2f} / {times[0][1]:.2f} s"
            print(f"| {name} | {'on' if check else 'off'} | {first} | {wall:.2f} / {cpu:.2f} s |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--time"]:
        torch.set_num_threads(1)
        time_twelve_layers()
        sys.exit(0)
    print("| model | family | traced by | self-check | unpermuted | permuted = same | WM keeps B |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(ZOO):
        zm = ZOO[name]
        r = check_model(name)
        print(
            f"| `{name}` | {zm.family} | {r['front']} ({r['seconds']:.2f} s) | passes | "
            f"{100 * r['unpermuted']:.2f}% (bound {100 * zm.max_unpermuted:.0f}%) | "
            f"{r['same']:.1e} | {r['wm']:.1e} |"
        )
