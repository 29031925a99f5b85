"""``dare_linear`` and ``dare_ties``: DARE's random drop of task-vector entries, then task
arithmetic or TIES' sign election (Yu et al. 2024; mergekit's ``dare_linear`` /
``dare_ties``)."""

from __future__ import annotations

from pymerge.merge._sparsify import register_task_vector_method

merge_dare_linear = register_task_vector_method(
    name="dare_linear",
    sparsify="random",
    consensus=False,
    normalize=False,
    rescale=True,
    reference=(
        "Yu et al. 2024, Language models are Super Mario, DARE (arXiv 2311.03099); "
        "mergekit 'dare_linear'"
    ),
    doc="""DARE (linear): keep each task-vector entry with probability ``density`` (``u < density``,
``u`` from pymerge's counter-based stream for ``seed``), rescale the kept vector to the L1
norm of the whole one (``rescale``, the default), and add ``lambda * sum_i w_i tau_i``.

As mergekit's ``dare_linear``, except the random masks: they come from
:func:`pymerge.ops.rng.uniform` (model ``i``'s draws for a key are elements ``[i n, (i+1) n)``
of its stream), so every backend and run gives the same masks for a seed, but not
mergekit's (torch's global generator): parity with mergekit holds in distribution, and
exactly at ``density=1``. mergekit's L1 rescale matches the paper's ``1 / density`` in
expectation.""",
    module=__name__,
)

merge_dare_ties = register_task_vector_method(
    name="dare_ties",
    sparsify="random",
    consensus=True,
    normalize=False,
    rescale=True,
    reference=(
        "Yu et al. 2024, DARE (arXiv 2311.03099) with TIES sign election; mergekit 'dare_ties'"
    ),
    doc="""DARE with TIES: DARE's random drop and L1 rescale (see ``dare_linear``), then TIES' sign
election and disjoint sum (``normalize=False`` by default, as mergekit's ``dare_ties``).

Random masks from pymerge's counter-based stream, not mergekit's: parity in distribution,
exact at ``density=1``.""",
    module=__name__,
)
