"""Triton kernels, installed as ``pymerge.kernels``.

Nothing here knows about models or state dicts: kernels take tensors and return
tensors. Import these modules only through the fronts in ``pymerge.ops``, which
import them lazily (a machine without Triton still imports pymerge).
"""
