"""The output contract shared by every zoo model, and the input checks they all make."""

from typing import NamedTuple

import torch

__all__ = ["ModelOutput", "check_image_batch", "logits_of"]


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


def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Raise a ValueError that names the problem when ``x`` is not an image batch the model can take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name} expects a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(
            f"{model_name} expects an image batch [B, C, H, W], got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    height, width = x.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(
            f"input {height}x{width} is too small for {model_name}: its last stage has stride {min_size}, "
            f"so height and width must be at least {min_size}"
        )
