"""``ties``: TIES-Merging, trim, elect sign, disjoint merge (Yadav et al. 2023; mergekit's
``ties``)."""

from __future__ import annotations

from pymerge.merge._sparsify import register_task_vector_method

merge_tensor = register_task_vector_method(
    name="ties",
    sparsify="magnitude",
    consensus=True,
    normalize=True,
    rescale=False,
    reference="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708); mergekit 'ties'",
    doc="""TIES: keep each task vector's ``max(1, int(density * n))`` largest magnitudes, weight
them, elect each entry's sign as the sign of the sum of the weighted vectors (0 counts as
+), and add ``lambda`` times the sum of the agreeing entries, divided (``normalize``, the
default) by the sum of the agreeing models' weights, to the base.

As mergekit's ``ties``: weights apply before the sign election; ``density=1`` (the default)
keeps everything; ``rescale=True`` rescales each trimmed vector to its L1 norm. The
threshold is an exact radix select on the magnitudes (no sort).""",
    module=__name__,
)
