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
any work (mergekit divides by 1).

Differs from mergekit on purpose (see :mod:`pymerge.merge._sparsify`): ``weight`` defaults
to 1; ties at a trimming boundary go by flat position; the task vector is rounded to the
storage dtype and the rest computed in float32 (float64 for float64 inputs), rounded once;
``int8_mask`` has no counterpart.""",
    module=__name__,
)
