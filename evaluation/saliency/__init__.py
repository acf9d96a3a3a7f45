"""Saliency methods on one shared mechanism: ``explain(model, images, method, targets=None, layer=None,
**options)`` returns maps ``[B, H, W]`` in [0, 1]; ``METHODS`` maps every method name to its function."""

from . import cam, gradients, opticam, transformer  # noqa: F401  (registers the methods)
from .core import (
    METHODS,
    Explainer,
    check_options,
    default_layer,
    explain,
    mask_images,
    normalise_per_image,
    pixel_statistics,
    saliency_method,
)
from .tokens import has_patch_grid

__all__ = ["METHODS", "Explainer", "check_options", "default_layer", "explain", "has_patch_grid", "mask_images",
           "normalise_per_image", "pixel_statistics", "saliency_method"]
