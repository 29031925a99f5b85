"""pymerge: merge neural networks and study the loss landscape between them.

The public API is re-exported here and imported lazily, so ``import pymerge``
stays fast and works without the optional pieces (Triton, the C++ extension).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"


def _warn_if_source_tree_without_native() -> None:
    """Warn once when this is a source checkout (``csrc/`` beside the package) whose compiled
    modules cannot be found: everything would silently run the slow fallbacks."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "csrc").is_dir() or importlib.util.find_spec("pymerge._lap") is not None:
        return
    import warnings

    warnings.warn(
        f"pymerge is imported from the source tree at {checkout}, which has no compiled "
        "modules (pymerge._lap, pymerge._multi_tensor): the NumPy/torch fallbacks will run. "
        "Install it (`pip install .`) and run from another folder, or build in place with "
        "`pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=3,
    )


_warn_if_source_tree_without_native()

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "backends": "pymerge._backend",
    # assignment (issue 2)
    "linear_sum_assignment": "pymerge.ops.assignment",
    "linear_sum_assignment_batch": "pymerge.ops.assignment",
    "AssignmentResult": "pymerge.ops.assignment",
    "solve_assignment": "pymerge.ops.assignment",
    # fused primitives (issue 3)
    "CorrelationAccumulator": "pymerge.ops",
    "correlation": "pymerge.ops",
    "interpolate": "pymerge.ops",
    "permuted_interpolate": "pymerge.ops",
    # permutation specs (issue 4)
    "PermutationSpec": "pymerge.spec",
    "AxisRef": "pymerge.spec",
    "HeadStructure": "pymerge.spec",
    "ActivationPoint": "pymerge.spec",
    "spec_from_model": "pymerge.spec",
    "register_module_rule": "pymerge.spec",
    "register_function_rule": "pymerge.spec",
    "check_spec": "pymerge.spec",
    "SpecCheckError": "pymerge.spec",
    "apply_permutation": "pymerge.spec",
    "random_permutation": "pymerge.spec",
    "identity_permutation": "pymerge.spec",
    "permute_param": "pymerge.spec",
    "invert_permutation": "pymerge.spec",
    "compose_permutations": "pymerge.spec",
    "permutation_index_map": "pymerge.spec",
    "check_permutation": "pymerge.spec",
    "Permutation": "pymerge.spec",
    "mlp_spec": "pymerge.spec",
    "cnn_spec": "pymerge.spec",
    "resnet_spec": "pymerge.spec",
    "vgg_spec": "pymerge.spec",
    "transformer_spec": "pymerge.spec",
    "hf_spec": "pymerge.spec",
    "hf_architectures": "pymerge.spec",
    "aligned_interpolate": "pymerge.spec",
    # alignment (issue 4)
    "weight_matching": "pymerge.align",
    "activation_matching": "pymerge.align",
    "ste_matching": "pymerge.align",
    "align_to_anchor": "pymerge.align",
    "merge_many": "pymerge.align",
    "matching_objective": "pymerge.align",
    "AlignmentResult": "pymerge.align",
    "AlignmentHistory": "pymerge.align",
    "MultiAlignmentResult": "pymerge.align",
    "repair": "pymerge.align",
    "reset_bn_stats": "pymerge.align",
    "distributed_weight_matching": "pymerge.align.distributed",
    # files (issue 11)
    "open_checkpoint": "pymerge.io",
    "Checkpoint": "pymerge.io",
    "CheckpointWriter": "pymerge.io",
    "interpolation_curve": "pymerge.landscape",
    "Curve": "pymerge.landscape",
    "loss_barrier": "pymerge.landscape",
    "error_barrier": "pymerge.landscape",
    # LMC curves, singular-vector alignment, manifold size, the four aspects (issue 9)
    "Evaluator": "pymerge.landscape",
    "multi_model_barrier": "pymerge.landscape",
    "MultiBarrier": "pymerge.landscape",
    "singular_vector_alignment": "pymerge.landscape",
    "SVDAlignment": "pymerge.landscape",
    "minima_manifold_size": "pymerge.landscape",
    "ManifoldSize": "pymerge.landscape",
    "rank_expansions": "pymerge.landscape",
    "expand_mlp": "pymerge.landscape",
    "aspects_report": "pymerge.landscape",
    "AspectsReport": "pymerge.landscape",
    # Hessian spectra, slices and surfaces, curved paths (issue 9)
    "HessianResult": "pymerge.landscape",
    "hessian_eigenvalues": "pymerge.landscape",
    "hessian_trace": "pymerge.landscape",
    "hessian_density": "pymerge.landscape",
    "hessian_vector_product": "pymerge.landscape",
    "layer_groups": "pymerge.landscape",
    "Surface": "pymerge.landscape",
    "random_direction": "pymerge.landscape",
    "loss_slice": "pymerge.landscape",
    "loss_surface": "pymerge.landscape",
    "loss_plane": "pymerge.landscape",
    "CurvedPath": "pymerge.landscape",
    "PathCurve": "pymerge.landscape",
    "connect": "pymerge.landscape",
    "path_curve": "pymerge.landscape",
    # weight scope alignment (issue 10)
    "LayerScope": "pymerge.wsa",
    "weight_scope": "pymerge.wsa",
    "ScopeRegularizer": "pymerge.wsa",
    "fuse_scopes": "pymerge.wsa",
    "fuse_stages": "pymerge.wsa",
    "rescale_to_scope": "pymerge.wsa",
    "scope_kl": "pymerge.wsa",
    # merging (issue 10): the name ``merge`` is the function; the subpackage of the same
    # name is callable as it (pymerge/merge/__init__.py)
    "merge": "pymerge.merge",
    "merge_methods": "pymerge.merge",
    "task_vector_similarity": "pymerge.merge.analysis",
    "TaskVectorSimilarity": "pymerge.merge.analysis",
}

_SUBMODULES = ("ops", "spec", "align", "wsa", "kernels", "landscape", "testing", "cli")

# names of 0.1 that changed in 0.2: old name -> (new public name or None, what to do)
_DEPRECATED: dict[str, tuple[str | None, str]] = {
    "WeightMatchingResult": ("AlignmentResult", "alignment functions return AlignmentResult"),
    "ActivationMatchingResult": (
        "AlignmentResult",
        "alignment functions return AlignmentResult (correlations/stats are in .extras)",
    ),
    "SteResult": ("AlignmentResult", "ste_matching returns AlignmentResult"),
    "MergeManyResult": ("MultiAlignmentResult", "merge_many returns MultiAlignmentResult"),
    "average_aligned": (
        None,
        "use pymerge.interpolate([apply_permutation(spec, p, s) for p, s in zip(perms, "
        "states)], weights), the one averaging entry point",
    ),
    "interpolate_state": (
        None,
        "use pymerge.interpolate([state_a, state_b], [1 - lam, lam]) or "
        "pymerge.aligned_interpolate(spec, perm, state_a, state_b, lam)",
    ),
}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"pymerge.{name}")
        globals()[name] = module
        return module
    if name in _DEPRECATED:
        new, how = _DEPRECATED[name]
        if new is None:
            raise AttributeError(f"pymerge.{name} was removed in 0.2: {how}")
        import warnings

        warnings.warn(f"pymerge.{name} is deprecated: {how}", DeprecationWarning, stacklevel=2)
        return __getattr__(new)
    raise AttributeError(f"module 'pymerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover  (what the lazy exports resolve to, for IDEs)
    from pymerge._backend import (  # noqa: F401
        backends,
    )
    from pymerge.align import (  # noqa: F401
        AlignmentHistory,
        AlignmentResult,
        MultiAlignmentResult,
        activation_matching,
        align_to_anchor,
        matching_objective,
        merge_many,
        repair,
        reset_bn_stats,
        ste_matching,
        weight_matching,
    )
    from pymerge.align.distributed import (  # noqa: F401
        distributed_weight_matching,
    )
    from pymerge.io import (  # noqa: F401
        Checkpoint,
        CheckpointWriter,
        open_checkpoint,
    )
    from pymerge.landscape import (  # noqa: F401
        AspectsReport,
        Curve,
        CurvedPath,
        Evaluator,
        HessianResult,
        ManifoldSize,
        MultiBarrier,
        PathCurve,
        Surface,
        SVDAlignment,
        aspects_report,
        connect,
        error_barrier,
        expand_mlp,
        hessian_density,
        hessian_eigenvalues,
        hessian_trace,
        hessian_vector_product,
        interpolation_curve,
        layer_groups,
        loss_barrier,
        loss_plane,
        loss_slice,
        loss_surface,
        minima_manifold_size,
        multi_model_barrier,
        path_curve,
        random_direction,
        rank_expansions,
        singular_vector_alignment,
    )
    from pymerge.merge import (  # noqa: F401
        merge,
        merge_methods,
    )
    from pymerge.merge.analysis import (  # noqa: F401
        TaskVectorSimilarity,
        task_vector_similarity,
    )
    from pymerge.ops import (  # noqa: F401
        CorrelationAccumulator,
        correlation,
        interpolate,
        permuted_interpolate,
    )
    from pymerge.ops.assignment import (  # noqa: F401
        AssignmentResult,
        linear_sum_assignment,
        linear_sum_assignment_batch,
        solve_assignment,
    )
    from pymerge.spec import (  # noqa: F401
        ActivationPoint,
        AxisRef,
        HeadStructure,
        Permutation,
        PermutationSpec,
        SpecCheckError,
        aligned_interpolate,
        apply_permutation,
        check_permutation,
        check_spec,
        cnn_spec,
        compose_permutations,
        hf_architectures,
        hf_spec,
        identity_permutation,
        invert_permutation,
        mlp_spec,
        permutation_index_map,
        permute_param,
        random_permutation,
        register_function_rule,
        register_module_rule,
        resnet_spec,
        spec_from_model,
        transformer_spec,
        vgg_spec,
    )
    from pymerge.wsa import (  # noqa: F401
        LayerScope,
        ScopeRegularizer,
        fuse_scopes,
        fuse_stages,
        rescale_to_scope,
        scope_kl,
        weight_scope,
    )
