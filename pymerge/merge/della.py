"""``della`` and ``della_linear``: DELLA's magnitude-ranked stochastic drop (Deep et al. 2024;
mergekit's ``della`` / ``della_linear``)."""

from __future__ import annotations

from pymerge.merge._sparsify import register_task_vector_method

merge_della = register_task_vector_method(
    name="della",
    sparsify="della_magprune",
    consensus=True,
    normalize=True,
    rescale=True,
    reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617); mergekit 'della'",
    doc="""DELLA: keep each task-vector entry with probability ``(density - epsilon) + 2 epsilon
r / (C - 1)``, ``r`` the rank of its magnitude in its row (dim 1; a 1-D tensor is one row),
so larger entries survive more often; rescale to the L1 norm (``rescale``), then TIES' sign
election and disjoint mean (``normalize``).

As mergekit's ``della`` (``epsilon=0.15``; ``density +/- epsilon`` must lie in (0, 1)),
except the random masks (pymerge's counter-based stream for ``seed``: parity with mergekit
in distribution, exact at ``density=1``) and rows of one entry (probability ``density``;
mergekit divides by zero). The paper rescales survivors by ``1 / p``; mergekit (and pymerge)
rescale to the L1 norm.""",
    module=__name__,
)

merge_della_linear = register_task_vector_method(
    name="della_linear",
    sparsify="della_magprune",
    consensus=False,
    normalize=False,
    rescale=True,
    reference=(
        "Deep et al. 2024, DELLA-Merging (arXiv 2406.11617), linear variant; "
        "mergekit 'della_linear'"
    ),
    doc="""DELLA without sign election: DELLA's rank-based drop and rescale (see ``della``), then
task arithmetic (``normalize=False`` by default, as mergekit's ``della_linear``).

Random masks from pymerge's counter-based stream: parity with mergekit in distribution,
exact at ``density=1``.""",
    module=__name__,
)
