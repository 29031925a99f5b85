"""``breadcrumbs`` and ``breadcrumbs_ties``: Model Breadcrumbs' two-sided magnitude trim
(Davari & Belilovsky 2023; mergekit's ``breadcrumbs`` / ``breadcrumbs_ties``)."""

from __future__ import annotations

from pymerge.merge._sparsify import register_task_vector_method

merge_breadcrumbs = register_task_vector_method(
    name="breadcrumbs",
    sparsify="magnitude_outliers",
    consensus=False,
    normalize=False,
    rescale=False,
    reference=(
        "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795); mergekit 'breadcrumbs'"
    ),
    doc="""Model Breadcrumbs: per task vector drop the ``int(gamma * n)`` largest magnitudes
(outliers) and the smallest, keeping ``int(density * n)`` entries (fewer outliers are dropped
when both do not fit), then task arithmetic.

As mergekit's ``breadcrumbs`` (``gamma=0.01``; ``density=1`` keeps everything, outliers
included).""",
    module=__name__,
)

merge_breadcrumbs_ties = register_task_vector_method(
    name="breadcrumbs_ties",
    sparsify="magnitude_outliers",
    consensus=True,
    normalize=False,
    rescale=False,
    reference=(
        "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795) with TIES sign election; "
        "mergekit 'breadcrumbs_ties'"
    ),
    doc="""Model Breadcrumbs with TIES: the breadcrumbs trim (see ``breadcrumbs``), then TIES' sign
election and disjoint sum (``normalize=False`` by default, as mergekit's
``breadcrumbs_ties``).""",
    module=__name__,
)
