"""The output contract shared by every zoo model, and the input checks they (and ``explain``) make."""

from typing import NamedTuple

import torch

__all__ = ["ModelOutput", "check_image_batch", "logits_of", "model_name"]


class ModelOutput(NamedTuple):
    """What a zoo model's forward returns: logits and its built-in saliency, from one pass.

    ``logits`` is ``[B, num_classes]``; ``saliency`` is ``[B, h, w]`` at the resolution of the
    feature map it comes from (upsample it to the image to overlay it).
    """

    logits: torch.Tensor
    saliency: torch.Tensor


def logits_of(output) -> torch.Tensor:
    """The logits of any classifier's output: a zoo ``ModelOutput``, a tuple whose first item they are, or the
    plain tensor of a timm or torchvision model."""
    return output[0] if isinstance(output, tuple) else output


def model_name(model: torch.nn.Module) -> str:
    """The name a model goes by in error messages: its timm architecture, else its class's name."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def check_image_batch(x: torch.Tensor, in_chans: int, name: str, min_size: int | None = None) -> None:
    """Raise an error that names the problem unless ``x`` is a floating-point image batch [B, in_chans, H, W]
    (a TypeError for anything but a tensor, a ValueError otherwise), at least ``min_size`` pixels high and wide
    when given: the stride of the model's last stage."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} expects an image batch [B, C, H, W], got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point image batch, got {x.dtype}")
    height, width = x.shape[-2:]
    if min_size is not None and min(height, width) < min_size:
        raise ValueError(
            f"input {height}x{width} is too small for {name}: its last stage has stride {min_size}, "
            f"so height and width must be at least {min_size}"
        )
