"""The survey's four aspects of loss-landscape geometry as one report of numbers.

Khan et al. (SoK, 2024) organise model merging by four aspects of the landscape. Each is
measured here by a working definition (from ``PAPERS.md``; the survey names the aspects and
what they mean, these are the measurements chosen for them):

==================  =====================================  ===================================
aspect              meaning                                value reported
==================  =====================================  ===================================
mode convexity      a basin is close to convex: inter-     Entezari et al.'s loss barrier
                    polations within it stay low-loss      sup_λ [L(θ(λ)) − ((1−λ)L_A + λL_B)]
                                                           along A → π(B) (aligned when a
                                                           permutation is given): 0 when the
                                                           loss never rises above the chord;
                                                           details: the mean curvature
                                                           d²L/dλ² (finite differences) and
                                                           the fraction of λ below the chord
determinism         runs sharing an early checkpoint end   the earliest spawn step k whose
                    in the same basin                      two runs (copies trained on from
                                                           step k) have a linear loss barrier
                                                           <= ``stability_tol``; details: the
                                                           barrier for every k
directedness        fine-tuning moves along consistent     the mean pairwise cosine similarity
                    task directions                        of the task vectors θ_t − θ_base;
                                                           details: the mean pairwise sign
                                                           agreement, both matrices
connectivity        distinct modes are joined by low-      the lowest Git Re-Basin loss
                    loss paths                             barrier max_λ L − ½(L_A + L_B)
                                                           among the paths measured: linear,
                                                           linear after alignment, curved
                                                           (a ``path_curve`` result)
==================  =====================================  ===================================

An aspect whose inputs are not given is reported with value ``None`` and a note saying what
it needs. Task-vector statistics come from :func:`pymerge.merge.task_vector_similarity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from pymerge.landscape.barrier import Curve, interpolation_curve, loss_barrier
from pymerge.spec.spec import PermutationSpec

__all__ = ["Aspect", "AspectsReport", "aspects_report", "ASPECT_DEFINITIONS"]

ASPECT_DEFINITIONS: dict[str, str] = {
    "mode convexity": (
        "Entezari loss barrier sup_λ [L(θ(λ)) − ((1−λ)L_A + λL_B)] along A → π(B) "
        "(0: never above the chord)"
    ),
    "determinism": (
        "earliest spawn step k whose two runs have a linear loss barrier <= tol "
        "(None: no k is stable)"
    ),
    "directedness": "mean pairwise cosine similarity of the task vectors θ_t − θ_base",
    "connectivity": (
        "lowest Git Re-Basin loss barrier max_λ L − ½(L_A + L_B) among the measured paths "
        "(linear, aligned linear, curved)"
    ),
}


@dataclass
class Aspect:
    """One row of the report: the number, what it means, how it was obtained."""

    name: str
    value: float | None
    definition: str
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class AspectsReport:
    """The four aspects (``aspects``, in the survey's order), as data and as a table."""

    aspects: list[Aspect]

    def __getitem__(self, name: str) -> Aspect:
        for a in self.aspects:
            if a.name == name:
                return a
        raise KeyError(f"no aspect {name!r}; the report has {[a.name for a in self.aspects]}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            a.name: {
                "value": a.value,
                "definition": a.definition,
                "details": a.details,
                "note": a.note,
            }
            for a in self.aspects
        }

    def table(self) -> str:
        rows = [("aspect", "value", "measured by")]
        for a in self.aspects:
            v = "—" if a.value is None else f"{a.value:.4g}"
            rows.append((a.name, v, a.definition + (f" [{a.note}]" if a.note else "")))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * min(100, max(len(x) for x in lines)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _convexity(curve: Curve, aligned: bool) -> Aspect:
    lam, v = curve.lambdas, curve["loss"]
    chord = (1 - lam) * v[0] + lam * v[-1]
    value = loss_barrier(curve, "entezari")
    second = np.diff(v, 2) / np.diff(lam)[:-1] ** 2 if lam.size >= 3 else np.array([np.nan])
    return Aspect(
        "mode convexity",
        value,
        ASPECT_DEFINITIONS["mode convexity"],
        {
            "path": "aligned" if aligned else "unaligned",
            "mean_curvature": float(np.mean(second)),
            "fraction_below_chord": float(np.mean(v <= chord + 1e-12)),
            "rebasin_barrier": loss_barrier(curve, "rebasin"),
        },
        "" if aligned else "no permutation given: along the unaligned path",
    )


def _connectivity(barriers: Mapping[str, float]) -> Aspect:
    finite = {k: v for k, v in barriers.items() if math.isfinite(v)}
    value = min(finite.values()) if finite else math.nan
    best = min(finite, key=finite.get) if finite else None
    return Aspect(
        "connectivity",
        value,
        ASPECT_DEFINITIONS["connectivity"],
        {"barriers": dict(barriers), "best_path": best},
    )


def _directedness(base, finetuned) -> Aspect:
    if base is None or finetuned is None:
        return Aspect(
            "directedness",
            None,
            ASPECT_DEFINITIONS["directedness"],
            note="not measured: give base= and finetuned= (>= 2 fine-tunes of base)",
        )
    from pymerge.merge.analysis import task_vector_similarity

    tuned = list(finetuned)
    if len(tuned) < 2:
        raise ValueError(f"directedness needs >= 2 fine-tuned models, got {len(tuned)}")
    sim = task_vector_similarity(tuned, base=base)
    k = len(tuned)
    off = ~np.eye(k, dtype=bool)
    cos = sim.cosine.numpy()
    sign = sim.sign_agreement.numpy()
    return Aspect(
        "directedness",
        float(np.nanmean(cos[off])),
        ASPECT_DEFINITIONS["directedness"],
        {
            "mean_sign_agreement": float(np.nanmean(sign[off])),
            "cosine": cos.tolist(),
            "sign_agreement": sign.tolist(),
            "norms": sim.norms.tolist(),
        },
    )


def _determinism(model, eval_fn, spawned, points, tol) -> Aspect:
    if spawned is None:
        return Aspect(
            "determinism",
            None,
            ASPECT_DEFINITIONS["determinism"].replace("tol", f"{tol:g}"),
            note="not measured: give spawned={k: (run_1, run_2)} (two runs from step k)",
        )
    if not isinstance(spawned, Mapping) or not spawned:
        raise ValueError("spawned must be a non-empty mapping k -> (state_1, state_2)")
    per_k = {}
    for k in sorted(spawned):
        pair = spawned[k]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"spawned[{k!r}] must be a (state_1, state_2) pair")
        curve = interpolation_curve(model, pair[0], pair[1], eval_fn, points)
        per_k[k] = loss_barrier(curve)
    stable = [k for k, b in per_k.items() if math.isfinite(b) and b <= tol]
    return Aspect(
        "determinism",
        float(stable[0]) if stable else None,
        ASPECT_DEFINITIONS["determinism"].replace("tol", f"{tol:g}"),
        {"barrier_by_spawn_step": per_k, "tol": tol},
        "" if stable else f"no spawn step reached a barrier <= {tol:g}",
    )


def aspects_report(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]],
    *,
    spec: PermutationSpec | None = None,
    perm: Mapping[str, Tensor] | None = None,
    align: bool = False,
    points: int = 25,
    curved: Any = None,
    base: Mapping[str, Tensor] | None = None,
    finetuned: Sequence[Mapping[str, Tensor]] | None = None,
    spawned: Mapping[int, tuple[Mapping[str, Tensor], Mapping[str, Tensor]]] | None = None,
    stability_tol: float = 0.02,
    verbose: bool = False,
) -> AspectsReport:
    """Mode convexity, determinism, directedness and connectivity as numbers (see the module
    docstring for each definition).

    Args:
        model, state_a, state_b, eval_fn: two modes and how to evaluate a model (an
            :class:`~pymerge.landscape.Evaluator`, or any ``eval_fn(model) -> loss`` /
            mapping with ``"loss"``); used for convexity and connectivity.
        spec, perm: align B to A with ``perm``; ``align=True`` computes it by weight
            matching (:func:`pymerge.align.weight_matching`) when ``perm`` is not given.
        points: λ per curve.
        curved: a curved path's result (:func:`pymerge.landscape.path_curve`, anything with
            ``barriers["curved"]``) for connectivity.
        base, finetuned: a pre-trained state and >= 2 fine-tunes of it (directedness).
        spawned: ``{k: (run_1, run_2)}``: final states of two runs spawned from the
            checkpoint at step k with different data order (determinism).
        stability_tol: the barrier under which two spawned runs count as one basin.
        verbose: also print the table.

    Returns:
        :class:`AspectsReport` (``print(report)`` shows the table).
    """
    if not (isinstance(stability_tol, (int, float)) and math.isfinite(stability_tol)):
        raise ValueError(f"stability_tol must be a finite number, got {stability_tol!r}")
    if align and perm is None:
        if spec is None:
            raise TypeError("align=True needs spec= to run weight matching")
        from pymerge.align.weight_matching import weight_matching

        perm = weight_matching(spec, state_a, state_b).perm
    naive = interpolation_curve(model, state_a, state_b, eval_fn, points)
    if "loss" not in naive.metrics:
        raise ValueError(f"eval_fn must report 'loss'; it reported {sorted(naive.metrics)}")
    barriers = {"linear": loss_barrier(naive)}
    aligned_curve = None
    if perm is not None:
        aligned_curve = interpolation_curve(
            model, state_a, state_b, eval_fn, points, spec=spec, perm=perm
        )
        barriers["aligned linear"] = loss_barrier(aligned_curve)
    if curved is not None:
        try:
            barriers["curved"] = float(curved.barriers["curved"])
        except (AttributeError, KeyError, TypeError):
            raise TypeError(
                "curved must be a path_curve result (with barriers['curved']), got "
                f"{type(curved).__name__}"
            ) from None
    report = AspectsReport(
        [
            _convexity(aligned_curve if aligned_curve is not None else naive, perm is not None),
            _determinism(model, eval_fn, spawned, points, float(stability_tol)),
            _directedness(base, finetuned),
            _connectivity(barriers),
        ]
    )
    if verbose:
        print(report.table())
    return report
