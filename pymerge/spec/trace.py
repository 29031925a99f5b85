"""Derive a PermutationSpec from an ``nn.Module`` with ``torch.fx``.

The model is symbolically traced, shapes are propagated on the example inputs, and every
tensor dimension that carries permutable features gets *tags*: pieces of union-find elements
(feature groups). Nodes are processed once each in topological order (no recursion), so deep
networks are fine.

- Linear / Conv / ConvTranspose / Embedding / MultiheadAttention outputs start elements;
  their inputs' feature axes join the producer's element (weight axis 1, ...).
- Norms (BatchNorm, LayerNorm, GroupNorm as head-structured blocks, InstanceNorm),
  elementwise activations, dropout, pooling, softmax pass features through.
- Elementwise ops with broadcasting (residual ``add``, ``mul``...) union the groups meeting on a
  dimension; parameters (``get_attr``, e.g. positional embeddings) join the group they meet.
- ``flatten`` / ``view`` / ``reshape`` keep groups with an ``inner`` block size; ``cat`` on
  the feature axis gives segments; ``permute`` / ``transpose`` move them.
- Hand-written attention: ``split`` / ``chunk`` of a feature axis splits its group into
  segment groups; ``view(..., H, D)`` of a whole group gives head-structured features
  (:class:`HeadStructure`); ``matmul`` / ``scaled_dot_product_attention`` couple q with k
  (contracted) and the heads of q/k with v; viewing heads back to ``[..., H*D]`` rejoins them.
  SwiGLU-style ``a * silu(g)`` after a ``chunk`` ties both halves.
- Groups reaching the model output, meeting an unpermuted tensor, or entering an op the
  tracer does not understand are frozen; the op is reported by node name (a warning and
  ``spec.report``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pymerge.spec._trace_rules import (
    _ACT_MODULES,
    _NORM_CH,
    DEFAULT_LEAF_MODULES,
    _Info,
    _process,
    _State,
    _Val,
)
from pymerge.spec.spec import ActivationPoint, AxisRef, HeadStructure, PermutationSpec

__all__ = ["spec_from_model", "DEFAULT_LEAF_MODULES"]


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves)


def spec_from_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    overrides: Mapping[str, Any] | Callable[[PermutationSpec], PermutationSpec] | None = None,
    leaf_modules: Sequence[type] = (),
    warn: bool = True,
) -> PermutationSpec:
    """Trace ``model`` with ``torch.fx`` and derive its :class:`PermutationSpec`.

    Args:
        model: the module (not modified: a deep copy is traced and run).
        example_inputs: a tensor or a tuple of positional inputs for shape propagation.
        overrides: ``{group: None}`` freezes a group, ``{group: [axis refs]}`` adds/replaces
            one, ``{"__free__": keys, "__merge__": [[g1, g2], ...]}``; or a callable
            ``spec -> spec``. See :meth:`PermutationSpec.override`.
        leaf_modules: extra module types not to trace into; they are treated as opaque
            (inputs frozen, params unpermuted) unless the tracer has a rule for them.
        warn: emit a warning listing what could not be handled.

    Returns:
        The spec; ``spec.report`` lists unsupported ops (by node name) and frozen groups.
        Groups are named after the first module producing them; attention groups are
        ``<mha>.qk`` / ``<mha>.vo`` with head structure ``<mha>``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    state = model.state_dict()
    # shapes only: propagate meta tensors (no compute), fall back to a real copy
    try:
        m = copy.deepcopy(model).to("meta").eval()
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
        gm = _trace_and_propagate(m, inputs, leaf_modules, type(model).__name__)
    except _TraceError as e:
        raise ValueError(
            f"{e} (submodules torch.fx cannot trace can be passed as "
            "leaf_modules=(Type, ...): they are then treated as opaque)"
        ) from e
    except Exception:  # noqa: BLE001 - some ops lack meta kernels
        m = copy.deepcopy(model).eval()
        gm = _trace_and_propagate(m, example_inputs, leaf_modules, type(model).__name__)
    st = _State()
    modules = dict(gm.named_modules())
    info = _Info(st)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        info[node] = _process(node, info, st, modules, state)
    spec = _build_spec(gm, info, st, state, modules, calls)
    if overrides is not None:
        spec = overrides(spec) if callable(overrides) else spec.override(overrides)
    if warn and any(r.startswith("unsupported") for r in spec.report):
        warnings.warn(
            "spec_from_model: " + "; ".join(r for r in spec.report if r.startswith("unsupported")),
            stacklevel=2,
        )
    return spec


class _TraceError(ValueError):
    pass


def _trace_and_propagate(
    m: nn.Module, inputs: tuple, leaf_modules: Sequence[type], model_name: str
) -> fx.GraphModule:
    tracer = _Tracer(DEFAULT_LEAF_MODULES + tuple(leaf_modules))
    try:
        graph = tracer.trace(m)
    except Exception as e:  # noqa: BLE001 - report any tracing failure clearly
        raise _TraceError(f"torch.fx could not trace {model_name}: {e}") from e
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"shape propagation of {model_name} on the example inputs failed: {e}"
            ) from e
    return gm


# ---------------------------------------------------------------------------- assembly
def _build_spec(
    gm: fx.GraphModule, info: dict, st: _State, state: dict, modules: dict, calls: dict[str, int]
) -> PermutationSpec:
    n_el = len(st.parent)
    canon: dict[str, str] = {}  # tied entries (one tensor under several keys) -> first key
    first_key: dict[tuple, str] = {}
    for k, t in state.items():
        if t.numel():
            canon[k] = first_key.setdefault(
                (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), k
            )
    # the same (param, axis) referenced from several elements: identical segments share one
    # permutation (shared modules); different or overlapping segments freeze both.
    seen: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {}
    for e in range(n_el):
        for r in st.refs[e]:
            t = state.get(r.param)
            if t is None:
                st.freeze(e, f"{r.param!r} is not in the state dict")
                continue
            ax = r.resolved_axis(t.ndim)
            s, stop = r.segment(t.shape[ax])
            seen.setdefault((canon.get(r.param, r.param), ax), []).append((s, stop, r.inner, e))
    for (param, ax), lst in seen.items():
        lst.sort()
        for i, (s0, e0, i0, el0) in enumerate(lst):
            for s1, e1, i1, el1 in lst[i + 1 :]:
                if s1 >= e0:
                    break
                if (s0, e0, i0) == (s1, e1, i1):
                    st.union(el0, el1)
                else:
                    st.freeze(el0, f"overlapping use of {param!r} axis {ax}")
                    st.freeze(el1, f"overlapping use of {param!r} axis {ax}")
    for e in range(n_el):
        for r in st.refs[e]:
            if r.param in st.poisoned:
                st.freeze(e, f"{r.param!r} {st.poisoned[r.param]}")
    roots = sorted({st.find(e) for e in range(n_el)})
    frozen_roots: dict[int, str] = {}
    for e, why in st.frozen.items():
        frozen_roots.setdefault(st.find(e), why)
    # head structures: merge those sharing a root, freeze conflicting ones (to a fixpoint)
    structs = [(h, d, {st.find(e) for e in els}, nm) for h, d, els, nm in st.heads]
    changed = True
    merged: list[tuple[int, int, set[int], str]] = []
    while changed:
        changed = False
        merged = []
        for h, d, rs, nm in structs:
            for i, (h2, d2, rs2, nm2) in enumerate(merged):
                if rs & rs2:
                    if (h, d) != (h2, d2):
                        for r in rs | rs2:
                            frozen_roots.setdefault(
                                r, f"conflicting head structures {nm!r} and {nm2!r}"
                            )
                    merged[i] = (h2, d2, rs | rs2, nm2 or nm)
                    changed = True
                    break
            else:
                merged.append((h, d, set(rs), nm))
        structs = merged
        for _h, _d, rs, nm in structs:
            if any(r in frozen_roots for r in rs) and not all(r in frozen_roots for r in rs):
                for r in rs:
                    frozen_roots.setdefault(r, f"head structure {nm!r} partly frozen")
                changed = True
    names = {r: st.names[r] for r in roots}
    p2a: dict[str, list[AxisRef]] = {}
    for e in range(n_el):
        r = st.find(e)
        if r in frozen_roots:
            continue
        for ref in st.refs[e]:
            t = state[ref.param]
            ax = ref.resolved_axis(t.ndim)
            s, stop = ref.segment(t.shape[ax])
            if s == 0 and stop == t.shape[ax]:
                stop = None
            norm = AxisRef(ref.param, ax, s, stop, ref.inner)
            lst = p2a.setdefault(names[r], [])
            if norm not in lst:
                lst.append(norm)
    # aliased state entries (tied / shared modules under several names) follow their twin
    by_ptr: dict[str, list[str]] = {}
    for k, c in canon.items():
        by_ptr.setdefault(c, []).append(k)
    covered = {ref.param for refs in p2a.values() for ref in refs}
    for keys in by_ptr.values():
        src = [k for k in keys if k in covered]
        if src and len(keys) > 1:
            for refs in p2a.values():
                extra = [
                    AxisRef(k, r.axis, r.start, r.stop, r.inner)
                    for r in refs
                    if r.param == src[0]
                    for k in keys
                    if k not in covered
                ]
                refs.extend(extra)
    heads = {}
    for h, d, rs, nm in structs:
        if all(r not in frozen_roots for r in rs):
            groups = tuple(sorted(names[r] for r in rs))
            nm = nm or f"{groups[0]}.heads"
            heads[nm if nm not in heads else f"{nm}@{len(heads)}"] = HeadStructure(h, d, groups)
    covered = {ref.param for refs in p2a.values() for ref in refs}
    free = {k for k in state if k not in covered}
    report = list(st.report)
    for r, why in sorted(frozen_roots.items()):
        if st.refs and any(st.find(e) == r and st.refs[e] for e in range(n_el)):
            report.append(f"frozen group {names[r]!r}: {why}")
    aps = _activation_points(gm, info, st, modules, calls, names, frozen_roots)
    no_cost = {k for k in st.no_cost if k in state}
    return PermutationSpec(
        p2a, free=free, no_cost=no_cost, heads=heads, activation_points=aps, report=report
    )


def _activation_points(
    gm: fx.GraphModule,
    info: dict,
    st: _State,
    modules: dict,
    calls: dict[str, int],
    names: dict[int, str],
    frozen: dict[int, str],
) -> dict[str, ActivationPoint]:
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    # output node of each non-leaf module called once (a contiguous run of its nodes)
    scope_nodes: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for path in (n.meta.get("nn_module_stack") or {}).values():
            p = path[0] if isinstance(path, tuple) else str(path)
            scope_nodes.setdefault(p, []).append(i)
    block_out: dict[int, str] = {}
    for path, idxs in scope_nodes.items():
        if not path or path in calls or idxs != list(range(idxs[0], idxs[-1] + 1)):
            continue
        last = nodes[idxs[-1]]
        if any(pos[u] <= idxs[-1] for u in last.users):
            continue
        if path in modules and not isinstance(modules[path], DEFAULT_LEAF_MODULES):
            block_out.setdefault(idxs[-1], path)
    best: dict[int, tuple[tuple[int, int, int], str, int]] = {}
    for i, n in enumerate(nodes):
        v = info.get(n)
        if not isinstance(v, _Val) or len(v.tags) != 1:
            continue
        ((d, pieces),) = v.tags.items()
        if (
            len(pieces) != 1
            or pieces[0].inner != 1
            or pieces[0].start != 0
            or pieces[0].n != v.shape[d]
            or pieces[0].role != "full"
        ):
            continue
        r = st.find(pieces[0].elem)
        if r in frozen:
            continue
        dim = 1 if d == 1 else d - v.ndim
        cands = []
        if n.op == "call_module" and calls.get(n.target, 0) == 1:
            mod = modules[n.target]
            prio = (
                0
                if isinstance(mod, _ACT_MODULES)
                else 2
                if isinstance(mod, (*_NORM_CH, nn.LayerNorm, nn.GroupNorm))
                else 3
            )
            cands.append((prio, n.target))
        if i in block_out:
            cands.append((1, block_out[i]))
        for prio, mname in cands:
            # activations first, then whole blocks (shallowest: the full residual stream)
            rank = (prio, mname.count(".") if prio == 1 else 0, i)
            cur = best.get(r)
            if cur is None or rank < cur[0]:
                best[r] = (rank, mname, dim)
    return {names[r]: ActivationPoint(mname, dim) for r, (_, mname, dim) in best.items()}
