"""The task-vector family's shared registration: mergekit's "generalized task arithmetic".

Each method is task vectors ``tau_i = theta_i - theta_0`` against a required base, an optional
sparsification of each (magnitude top-k, random drop, breadcrumbs' two-sided trim, DELLA's
rank-based drop), per-model weights, an optional TIES sign election with a disjoint mean, an
optional normalisation by the (agreeing) weights, and the ``lambda`` scale:
``theta = theta_0 + lambda * merged``. The arithmetic lives in :mod:`pymerge.ops.task_vectors`
(C++ / Triton / torch behind one front); this module maps the methods' declared parameters
(mergekit's names and defaults) onto it.

Methods (mergekit's table of defaults; every one takes ``weight``, ``density``, ``normalize``,
``rescale`` and ``lambda``):

=================  ====================  =========  =========  =========  ==========
method             sparsification        consensus  normalize  rescale    extra
=================  ====================  =========  =========  =========  ==========
task_arithmetic    none                  no         False      False
ties               magnitude             sum        True       False
dare_linear        random                no         False      True       seed
dare_ties          random                sum        False      True       seed
breadcrumbs        magnitude_outliers    no         False      False      gamma=0.01
breadcrumbs_ties   magnitude_outliers    sum        False      False      gamma=0.01
della              della_magprune        sum        True       True       epsilon=0.15, seed
della_linear       della_magprune        no         False      True       epsilon=0.15, seed
=================  ====================  =========  =========  =========  ==========

Where pymerge differs from mergekit on purpose (each method's docstring repeats what applies):

* ``weight`` defaults to 1 (mergekit requires it).
* Random draws (DARE, DELLA) come from pymerge's counter-based stream
  (:mod:`pymerge.ops.rng`, seeded by ``seed``), not torch's global generator, so every
  backend and every run gives the same masks; the masks differ from mergekit's (compare them
  statistically, or at ``density=1`` where nothing is dropped).
* Magnitude ties at a trimming boundary go by flat position (exactly the stated count is
  kept); mergekit's ``argsort`` is unstable, so which tied entries it keeps is unspecified.
* The task vector is rounded to the models' storage dtype (as mergekit's is when it computes
  in that dtype, its default); everything after it is computed in float32 (float64 for
  float64 inputs) and rounded once, where mergekit rounds every step to its compute dtype.
* Without sign election, ``normalize=True`` with weights summing to zero (below 1e-8) is an
  error before any work (mergekit silently divides by 1).
* ``int8_mask`` (a memory option of mergekit's mask) has no counterpart: no mask is stored.
* DELLA on a tensor whose rows hold one entry (a 0-d tensor, or a column vector) uses the
  keep probability ``density`` (mergekit divides by zero there); ``density +/- epsilon``
  must lie in (0, 1) as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pymerge.merge.registry import Param, StateContext, TensorContext, register_method
from pymerge.ops import TaskVectorParams, merge_task_vector_tensor, merge_task_vectors

__all__ = ["register_task_vector_method", "tv_params"]


def tv_params(params: Mapping[str, Any], k: int) -> TaskVectorParams:
    """The ops-level parameters of one key from the registry's resolved values."""
    return TaskVectorParams.make(
        k,
        weight=params["weight"],
        density=params.get("density", 1.0),
        gamma=params.get("gamma", 0.01),
        epsilon=params.get("epsilon", 0.15),
        lam=params["lambda"],
        normalize=params["normalize"],
        rescale=params["rescale"],
    )


def _params(sparsify: str, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    ps = [
        Param(
            "weight",
            1.0,
            per_model=True,
            doc="the model's weight (its task vector is scaled by it)",
        ),
        Param(
            "density",
            1.0,
            per_model=True,
            doc="fraction of the task vector kept"
            + (" (no effect without sparsification)" if sparsify == "none" else ""),
            low=0.0,
            high=1.0,
            open_low=True,
        ),
        Param(
            "normalize",
            normalize,
            doc="divide by the sum of the weights (of the agreeing models, with sign election)",
        ),
        Param(
            "rescale",
            rescale,
            doc="rescale each sparsified task vector to its L1 norm before sparsification",
        ),
        Param("lambda", 1.0, doc="scale of the merged task vector"),
    ]
    if sparsify == "magnitude_outliers":
        ps.append(
            Param(
                "gamma",
                0.01,
                per_model=True,
                doc="fraction of the largest-magnitude entries dropped as outliers",
                low=0.0,
                high=1.0,
            )
        )
    if sparsify == "della_magprune":
        ps.append(
            Param(
                "epsilon",
                0.15,
                per_model=True,
                doc="half-width of the rank-based keep probabilities around density",
                low=0.0,
                high=1.0,
            )
        )
    return tuple(ps)


def _make_check(name: str, sparsify: str, consensus: bool):
    def check(params: Mapping[str, Any], key: str, k: int) -> None:
        if not consensus and params["normalize"] and abs(math.fsum(params["weight"])) < 1e-8:
            raise ValueError(
                f"{name}: the weights {list(params['weight'])} sum to zero at key {key!r}, "
                "which normalize=True cannot divide by (pass normalize=False, or other weights)"
            )
        if sparsify == "della_magprune":
            for i, (d, e) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
                if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                    raise ValueError(
                        f"{name}: density {d!r} +/- epsilon {e!r} (model {i}, key {key!r}) "
                        "must lie in (0, 1)"
                    )

    return check


#: the deliberate differences from mergekit every method of the family shares (appended to
#: each method's docstring)
DIFFERENCES = """Differs from mergekit on purpose (see :mod:`pymerge.merge._sparsify`): ``weight``
defaults to 1; ties at a trimming boundary go by flat position; the task vector is rounded to
the storage dtype and the rest computed in float32 (float64 for float64 inputs), rounded once;
``int8_mask`` has no counterpart."""


def register_task_vector_method(
    *,
    name: str,
    sparsify: str,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
    doc: str,
    module: str,
):
    """Register one method of the family (its per-tensor function and the whole-state fast
    path through :func:`pymerge.ops.merge_task_vectors`); returns the per-tensor function,
    documented by ``doc`` followed by :data:`DIFFERENCES`."""
    stochastic = sparsify in ("random", "della_magprune")

    def merge_state(ctx: StateContext) -> dict[str, torch.Tensor]:
        """Every key in one call of the fused front (per-key parameters kept apart)."""
        k = len(ctx.states)
        params = {key: tv_params(ctx.params[key], k) for key in ctx.keys}
        subs = [{key: s[key] for key in ctx.keys} for s in ctx.states]
        base = {key: ctx.base[key] for key in ctx.keys}
        return merge_task_vectors(
            subs, base, params, sparsify=sparsify, consensus=consensus, seed=ctx.seed
        )

    def merge_tensor(ctx: TensorContext) -> torch.Tensor:
        return merge_task_vector_tensor(
            list(ctx.tensors),
            ctx.base,
            tv_params(ctx.params, ctx.k),
            key=ctx.key,
            sparsify=sparsify,
            consensus=consensus,
            seed=ctx.seed,
        )

    merge_tensor.__doc__ = f"{doc}\n\n{DIFFERENCES}"
    merge_tensor.__module__ = module
    merge_tensor.__name__ = f"merge_tensor_{name}"
    merge_tensor.__qualname__ = merge_tensor.__name__
    register_method(
        name=name,
        params=_params(sparsify, normalize, rescale),
        base="required",
        min_models=1,
        reference=reference,
        stochastic=stochastic,
        merge_state=merge_state,
        check=_make_check(name, sparsify, consensus),
    )(merge_tensor)
    return merge_tensor
