"""``task_arithmetic``: the sum of weighted task vectors (Ilharco et al. 2023; mergekit's
``task_arithmetic``)."""

from __future__ import annotations

from pymerge.merge._sparsify import register_task_vector_method

merge_tensor = register_task_vector_method(
    name="task_arithmetic",
    sparsify="none",
    consensus=False,
    normalize=False,
    rescale=False,
    reference=(
        "Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089); "
        "mergekit 'task_arithmetic'"
    ),
    doc="""Task arithmetic: ``theta_0 + lambda * sum_i w_i tau_i``, ``tau_i = theta_i - theta_0``
(``normalize=True``: divided by ``sum_i w_i``).

As mergekit's ``task_arithmetic``: ``density`` and ``rescale`` are accepted and change
nothing (no sparsification). With ``normalize=True``, weights summing to zero raise before
any work (mergekit divides by 1).""",
    module=__name__,
)
