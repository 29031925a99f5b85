"""Neuron alignment: weight matching, activation matching, STE, multi-model, REPAIR."""

from pymerge.align.activation_matching import ActivationMatchingResult, activation_matching
from pymerge.align.multi import (
    MergeManyHistory,
    MergeManyResult,
    align_to_anchor,
    average_aligned,
    merge_many,
)
from pymerge.align.repair import repair, reset_bn_stats
from pymerge.align.ste import SteHistory, SteResult, ste_matching
from pymerge.align.weight_matching import (
    MatchingHistory,
    WeightMatchingResult,
    matching_objective,
    weight_matching,
)

__all__ = [
    "ActivationMatchingResult",
    "MatchingHistory",
    "MergeManyHistory",
    "MergeManyResult",
    "SteHistory",
    "SteResult",
    "WeightMatchingResult",
    "activation_matching",
    "align_to_anchor",
    "average_aligned",
    "matching_objective",
    "merge_many",
    "repair",
    "reset_bn_stats",
    "ste_matching",
    "weight_matching",
]
