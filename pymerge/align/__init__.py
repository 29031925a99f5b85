"""Neuron alignment: weight matching, activation matching, STE, multi-model, REPAIR.

Every function takes the spec first, then the data, with options keyword-only, and returns
one result type per family: :class:`AlignmentResult` (one permutation, B onto A) or
:class:`MultiAlignmentResult` (one permutation per model).
"""

from pymerge.align.activation_matching import activation_matching
from pymerge.align.multi import align_to_anchor, merge_many
from pymerge.align.repair import repair, reset_bn_stats
from pymerge.align.result import AlignmentHistory, AlignmentResult, MultiAlignmentResult
from pymerge.align.ste import ste_matching
from pymerge.align.weight_matching import matching_objective, weight_matching

__all__ = [
    "AlignmentHistory",
    "AlignmentResult",
    "MultiAlignmentResult",
    "activation_matching",
    "align_to_anchor",
    "matching_objective",
    "merge_many",
    "repair",
    "reset_bn_stats",
    "ste_matching",
    "weight_matching",
]
