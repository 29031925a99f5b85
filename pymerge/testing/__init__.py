"""Reference models and helpers for tests, examples and benchmarks.

Not part of the library's core: nothing under ``pymerge/ops``, ``pymerge/spec``,
``pymerge/align``, ``pymerge/landscape`` or ``pymerge/merge`` imports it.
:mod:`pymerge.testing.models` holds small reference architectures (MLP, CNN, ResNet20/18,
VGG, TinyGPT), each with a ``spec()`` built by the hand-written builders.
"""
