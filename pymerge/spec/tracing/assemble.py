"""From the union-find state after the walk to a :class:`PermutationSpec`: shared and tied
parameters, frozen groups, head structures, activation points, the report."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from pymerge.spec.spec import ActivationPoint, AxisRef, HeadStructure, PermutationSpec
from pymerge.spec.tracing.registry import module_rule_for
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Value

__all__ = ["build_spec"]

_Struct = tuple[int, int, set[int], str]  # (num_heads, head_dim, roots, name)


def build_spec(
    gm: fx.GraphModule,
    info: dict,
    st: TraceState,
    state: dict,
    modules: dict[str, nn.Module],
    calls: dict[str, int] | None,
    ranked: dict[str, list[ActivationPoint]] | None = None,
) -> PermutationSpec:
    """The spec of the walked graph; ``calls`` counts the ``call_module`` nodes of a
    ``torch.fx`` graph (None: an exported graph, whose module calls are read from the
    nodes' ``nn_module_stack``). ``ranked``, when given, receives every group's activation
    point candidates, best first (the spec holds the first)."""
    canon = _canonical_keys(state)
    _unite_shared_axes(st, state, canon)
    n_el = len(st.parent)
    pinned = {(canon.get(k, k), a): why for (k, a), why in st.pinned.items()}
    for e in range(n_el):
        for r in st.refs[e]:
            if r.param in st.poisoned:
                st.freeze(e, f"{r.param!r} {st.poisoned[r.param]}")
            elif pinned and r.param in state:
                ax = r.resolved_axis(state[r.param].ndim)
                why = pinned.get((canon.get(r.param, r.param), ax))
                if why is not None:
                    st.freeze(e, f"{r.param!r} axis {ax} {why}")
    roots = sorted({st.find(e) for e in range(n_el)})
    frozen: dict[int, str] = {}
    for e, why in st.frozen.items():
        frozen.setdefault(st.find(e), why)
    structs = _head_structures(st, frozen)
    names = {r: st.names[r] for r in roots}
    p2a = _group_axes(st, state, frozen, names)
    _follow_aliases(p2a, canon)
    heads = {}
    for h, d, rs, nm in structs:
        if all(r not in frozen for r in rs):
            groups = tuple(sorted(names[r] for r in rs))
            nm = nm or f"{groups[0]}.heads"
            heads[nm if nm not in heads else f"{nm}@{len(heads)}"] = HeadStructure(h, d, groups)
    covered = {ref.param for refs in p2a.values() for ref in refs}
    free = {k for k in state if k not in covered}
    report = list(st.report)
    for r, why in sorted(frozen.items()):
        if st.refs and any(st.find(e) == r and st.refs[e] for e in range(n_el)):
            report.append(f"frozen group {names[r]!r}: {why}")
    cands = _activation_points(gm, info, st, modules, calls, names, frozen)
    if ranked is not None:
        ranked.update(cands)
    aps = {g: c[0] for g, c in cands.items() if g in p2a}
    no_cost = {k for k in st.no_cost if k in state}
    return PermutationSpec(
        p2a, free=free, no_cost=no_cost, heads=heads, activation_points=aps, report=report
    )


def _canonical_keys(state: dict) -> dict[str, str]:
    """Tied entries (one tensor under several keys) -> the first key."""
    canon: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for k, t in state.items():
        if t.numel():
            canon[k] = first_key.setdefault(
                (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), k
            )
    return canon


def _unite_shared_axes(st: TraceState, state: dict, canon: dict[str, str]) -> None:
    """The same (param, axis) referenced from several elements: identical segments share one
    permutation (shared modules); different or overlapping segments freeze both."""
    seen: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {}
    for e in range(len(st.parent)):
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


def _head_structures(st: TraceState, frozen: dict[int, str]) -> list[_Struct]:
    """Head structures by root: those sharing a root merge, conflicting ones freeze, a
    partly frozen one freezes whole (to a fixpoint)."""
    structs = [(h, d, {st.find(e) for e in els}, nm) for h, d, els, nm in st.heads]
    changed = True
    while changed:
        structs, changed = _merge_structs(structs, frozen)
        for _h, _d, rs, nm in structs:
            if any(r in frozen for r in rs) and not all(r in frozen for r in rs):
                for r in rs:
                    frozen.setdefault(r, f"head structure {nm!r} partly frozen")
                changed = True
    return structs


def _merge_structs(structs: list[_Struct], frozen: dict[int, str]) -> tuple[list[_Struct], bool]:
    changed = False
    merged: list[_Struct] = []
    for h, d, rs, nm in structs:
        for i, (h2, d2, rs2, nm2) in enumerate(merged):
            if rs & rs2:
                if (h, d) != (h2, d2):
                    for r in rs | rs2:
                        frozen.setdefault(r, f"conflicting head structures {nm!r} and {nm2!r}")
                merged[i] = (h2, d2, rs | rs2, nm2 or nm)
                changed = True
                break
        else:
            merged.append((h, d, set(rs), nm))
    return merged, changed


def _group_axes(
    st: TraceState, state: dict, frozen: dict[int, str], names: dict[int, str]
) -> dict[str, list[AxisRef]]:
    """Group name -> its axis references (normalised: resolved axis, whole-axis stop None)."""
    p2a: dict[str, list[AxisRef]] = {}
    for e in range(len(st.parent)):
        r = st.find(e)
        if r in frozen:
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
    return p2a


def _follow_aliases(p2a: dict[str, list[AxisRef]], canon: dict[str, str]) -> None:
    """Aliased state entries (tied / shared modules under several names) follow their twin."""
    by_ptr: dict[str, list[str]] = {}
    for k, c in canon.items():
        by_ptr.setdefault(c, []).append(k)
    covered = {ref.param for refs in p2a.values() for ref in refs}
    for keys in by_ptr.values():
        src = [k for k in keys if k in covered]
        if src and len(keys) > 1:
            for refs in p2a.values():
                refs.extend(
                    AxisRef(k, r.axis, r.start, r.stop, r.inner)
                    for r in [r for r in refs if r.param == src[0]]
                    for k in keys
                    if k not in covered
                )


# ---------------------------------------------------------------------------- activation points
_KIND_PRIORITY = {"activation": 0, "norm": 2}  # whole blocks: 1, other leaves: 3


def _block_outputs(nodes: list[fx.Node], modules: dict, calls: dict[str, int]) -> dict[int, str]:
    """Index of the output node of each traced-through module called once (a contiguous run
    of its nodes whose last one is used only after it) -> the module's path."""
    pos = {n: i for i, n in enumerate(nodes)}
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
        if path in modules and module_rule_for(type(modules[path])) is None:
            block_out.setdefault(idxs[-1], path)
    return block_out


def _whole_group_dim(v: Any) -> tuple[int, int] | None:
    """``(dim, element)`` when ``v`` carries exactly one whole plain group on one dim."""
    if not isinstance(v, Value) or len(v.tags) != 1:
        return None
    ((d, pieces),) = v.tags.items()
    if len(pieces) != 1:
        return None
    p = pieces[0]
    if p.inner != 1 or p.start != 0 or p.n != v.shape[d] or p.role != "full":
        return None
    return d, p.elem


def _activation_points(
    gm: fx.GraphModule,
    info: dict,
    st: TraceState,
    modules: dict,
    calls: dict[str, int],
    names: dict[int, str],
    frozen: dict[int, str],
) -> dict[str, list[ActivationPoint]]:
    """Where activation matching reads each group, best first: activation modules, then
    whole blocks (shallowest: the full residual stream), norms, other leaves; called once
    each."""
    nodes = list(gm.graph.nodes)
    if calls is None:
        exported = _module_call_outputs(nodes, modules)
    else:
        block_out = _block_outputs(nodes, modules, calls)
    best: dict[int, list[tuple[tuple[int, int, int], str, int]]] = {}
    for i, n in enumerate(nodes):
        v = info.get(n)
        found = _whole_group_dim(v)
        if found is None or st.find(found[1]) in frozen:
            continue
        d, r = found[0], st.find(found[1])
        dim = 1 if d == 1 else d - v.ndim
        if calls is None:
            cands = exported.get(i, [])
        else:
            cands = _candidates(n, i, modules, calls, block_out)
        for prio, mname in cands:
            rank = (prio, mname.count(".") if prio == 1 else 0, i)
            best.setdefault(r, []).append((rank, mname, dim))
    out: dict[str, list[ActivationPoint]] = {}
    for r, lst in best.items():
        seen: set[str] = set()
        for _, mname, dim in sorted(lst):
            if mname not in seen:
                seen.add(mname)
                out.setdefault(names[r], []).append(ActivationPoint(mname, dim))
    return out


def _candidates(
    n: fx.Node, i: int, modules: dict, calls: dict[str, int], block_out: dict[int, str]
) -> list[tuple[int, str]]:
    cands = []
    if n.op == "call_module" and calls.get(n.target, 0) == 1:
        entry = module_rule_for(type(modules[n.target]))
        cands.append((_KIND_PRIORITY.get(entry.kind, 3) if entry else 3, n.target))
    if i in block_out:
        cands.append((1, block_out[i]))
    return cands


def _module_call_outputs(nodes: list[fx.Node], modules: dict) -> dict[int, list[tuple[int, str]]]:
    """Exported graphs: node index -> ``(priority, module path)`` of the modules (called once)
    whose output that node is: the last of a contiguous run of the module's nodes and the
    only one used after it. Priority as for ``torch.fx`` graphs: activation modules 0,
    modules traced through (blocks) 1, norms 2, other layers 3."""
    pos = {n: i for i, n in enumerate(nodes)}
    scope: dict[str, list[int]] = {}
    keys: dict[str, set[str]] = {}
    for i, n in enumerate(nodes):
        for key, path in (n.meta.get("nn_module_stack") or {}).items():
            p = path[0] if isinstance(path, tuple) else str(path)
            scope.setdefault(p, []).append(i)
            keys.setdefault(p, set()).add(key)
    out: dict[int, list[tuple[int, str]]] = {}
    for path, idxs in scope.items():
        if not path or len(keys[path]) != 1 or path not in modules:
            continue
        if idxs != list(range(idxs[0], idxs[-1] + 1)):
            continue
        inside = set(idxs)
        used = [i for i in idxs if nodes[i].users]  # checks (asserts) have no users
        leaving = [i for i in used if any(pos[u] not in inside for u in nodes[i].users)]
        if not used or leaving != [used[-1]]:
            continue
        entry = module_rule_for(type(modules[path]))
        prio = _KIND_PRIORITY.get(entry.kind, 3) if entry is not None else 1
        out.setdefault(used[-1], []).append((prio, path))
    return out
