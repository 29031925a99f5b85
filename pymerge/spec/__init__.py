"""Permutation specs: which axes of which parameters each permutation group acts on.

Data (:class:`PermutationSpec`, :class:`AxisRef`, :class:`HeadStructure`,
:class:`ActivationPoint`), permutations (:func:`apply_permutation` and friends), hand-written
builders (:mod:`pymerge.spec.builders`), specs of Hugging Face architectures from their
config.json (:func:`hf_spec`, :mod:`pymerge.spec.hf`) and tracing with ``torch.fx`` or
``torch.export`` (:func:`spec_from_model`, self-checked; :func:`check_spec` checks any spec
on a model).
"""

from pymerge.spec.apply import (
    Permutation,
    apply_permutation,
    check_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    permutation_index_map,
    permute_param,
    random_permutation,
)
from pymerge.spec.builders import cnn_spec, mlp_spec, resnet_spec, transformer_spec, vgg_spec
from pymerge.spec.hf import hf_architectures, hf_spec
from pymerge.spec.interpolate import aligned_interpolate
from pymerge.spec.spec import ActivationPoint, AxisRef, HeadStructure, PermutationSpec
from pymerge.spec.trace import spec_from_model
from pymerge.spec.tracing import register_function_rule, register_module_rule
from pymerge.spec.tracing.check import SpecCheckError, check_spec

__all__ = [
    "ActivationPoint",
    "AxisRef",
    "HeadStructure",
    "Permutation",
    "PermutationSpec",
    "SpecCheckError",
    "aligned_interpolate",
    "apply_permutation",
    "check_permutation",
    "check_spec",
    "cnn_spec",
    "compose_permutations",
    "hf_architectures",
    "hf_spec",
    "identity_permutation",
    "invert_permutation",
    "mlp_spec",
    "permutation_index_map",
    "permute_param",
    "random_permutation",
    "register_function_rule",
    "register_module_rule",
    "resnet_spec",
    "spec_from_model",
    "transformer_spec",
    "vgg_spec",
]
