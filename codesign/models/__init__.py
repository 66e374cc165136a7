"""Flax NNX models. Every param names its logical axes (codesign.axes); nothing names a mesh axis."""

from codesign.models.transformer import Transformer, build_abstract, build_model

__all__ = ["Transformer", "build_abstract", "build_model"]
