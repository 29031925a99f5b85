"""Loss-landscape geometry: linear interpolation curves and barriers, Hessian spectra,
slices and surfaces, curved low-loss paths."""

from pymerge.landscape.aspects import ASPECT_DEFINITIONS, Aspect, AspectsReport, aspects_report
from pymerge.landscape.barrier import (
    BARRIER_KINDS,
    Curve,
    MultiBarrier,
    barrier,
    error_barrier,
    interpolation_curve,
    loss_barrier,
    multi_model_barrier,
)
from pymerge.landscape.curve_plot import plot_curves
from pymerge.landscape.evaluate import Evaluator
from pymerge.landscape.hessian import (
    HessianResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    layer_groups,
)
from pymerge.landscape.manifold import (
    ExpansionRank,
    ManifoldSize,
    cayley_menger_log_volume,
    expand_mlp,
    minima_manifold_size,
    rank_expansions,
)
from pymerge.landscape.paths import CurvedPath, PathCurve, connect, path_curve
from pymerge.landscape.slices import (
    Surface,
    loss_plane,
    loss_slice,
    loss_surface,
    random_direction,
)
from pymerge.landscape.svd import (
    LayerAlignment,
    SVDAlignment,
    plot_svd_alignment,
    singular_vector_alignment,
)

__all__ = [
    "BARRIER_KINDS",
    "Curve",
    "barrier",
    "error_barrier",
    "interpolation_curve",
    "loss_barrier",
    "Evaluator",
    "MultiBarrier",
    "multi_model_barrier",
    "LayerAlignment",
    "SVDAlignment",
    "plot_svd_alignment",
    "singular_vector_alignment",
    "ExpansionRank",
    "ManifoldSize",
    "cayley_menger_log_volume",
    "expand_mlp",
    "minima_manifold_size",
    "rank_expansions",
    "ASPECT_DEFINITIONS",
    "Aspect",
    "AspectsReport",
    "aspects_report",
    "plot_curves",
    "HessianResult",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "layer_groups",
    "Surface",
    "loss_plane",
    "loss_slice",
    "loss_surface",
    "random_direction",
    "CurvedPath",
    "PathCurve",
    "connect",
    "path_curve",
]
