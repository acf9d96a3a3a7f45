"""Patch tokens as feature maps, so that every CAM method and Opti-CAM run on vision transformers with no
user-written reshape.

A token layer of a timm ViT / DeiT outputs ``[B, N, C]`` with ``N = P + h * w``: the ``P =
num_prefix_tokens`` leading tokens (class, distillation, registers) then the patches in raster order. The
grid ``(h, w)`` comes from the model's patch embedding and the actual input size, so any size the model
accepts works. The map of channel k is the k-th feature of every patch token (thesis §3.2, eq. 3.2: ``F``
reshaped from ``p x d`` to ``w x h x d``); prefix tokens are no part of it.
"""

from dataclasses import dataclass

import torch
from torch import nn


def patch_grid(net: nn.Module, size: tuple[int, int], model_name: str) -> tuple[int, int]:
    """``(h, w)`` patches that ``net``'s patch embedding makes of an input of ``size`` (H, W), or a
    ValueError naming the model when that embedding does not accept the size (timm's own rules)."""
    embed = net.patch_embed
    height, width = (int(s) for s in size)
    strict = getattr(embed, "strict_img_size", False)
    if strict and tuple(embed.img_size) != (height, width):
        fixed = "x".join(map(str, embed.img_size))
        raise ValueError(f"{model_name} takes {fixed} inputs only (its patch_embed has a fixed size), got "
                         f"{height}x{width}; create it with img_size=({height}, {width}) or dynamic_img_size=True")
    ratio_h, ratio_w = embed.feat_ratio(as_scalar=False)
    if not (strict or getattr(embed, "dynamic_img_pad", False)) and (height % ratio_h or width % ratio_w):
        raise ValueError(f"a {height}x{width} input does not divide into the {ratio_h}x{ratio_w} patches of "
                         f"{model_name}'s patch_embed; use a multiple of the patch size")
    return tuple(embed.dynamic_feat_size((height, width)))


class MapLayout:
    """A convolutional layer's output: already maps ``[B, K, h, w]``."""

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def to_output(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return maps


@dataclass(frozen=True)
class TokenLayout:
    """A token layer's output ``[B, prefix + h * w, K]``: ``prefix`` leading tokens, then the patch grid."""

    prefix: int
    grid: tuple[int, int]

    def to_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, K]`` -> ``[B, K, h, w]``, prefix tokens dropped."""
        return tokens[:, self.prefix:].transpose(1, 2).unflatten(2, self.grid)

    def to_output(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, K, h, w]`` back into tokens, behind the prefix tokens of the layer's own ``output``."""
        return torch.cat([output[:, :self.prefix], maps.flatten(2).transpose(1, 2)], 1)


def layer_layout(net: nn.Module, output, size: tuple[int, int], model_name: str, layer_kind: str,
                 layer_name: str) -> MapLayout | TokenLayout:
    """How the output of a layer (its class name and dotted name) of ``net`` holds its feature maps for an
    input of ``size``, or a ValueError naming the model and the layer."""
    where = f"layer {layer_kind} of {model_name}"
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return MapLayout()
    if not isinstance(output, torch.Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{where} does not output a feature map [B, C, h, w] or tokens [B, N, C] (got {shape} "
                         f"from {layer_name!r}); choose a spatial layer with layer=")
    if not hasattr(net, "patch_embed"):
        raise ValueError(f"{where} outputs tokens {tuple(output.shape)} at {layer_name!r}, but {model_name} has no "
                         f"patch embedding (patch_embed) to place them on a grid; choose a layer with feature maps "
                         f"[B, C, h, w]")
    grid = patch_grid(net, size, model_name)
    prefix_tokens = getattr(net, "num_prefix_tokens", 0)
    prefix = output.shape[1] - grid[0] * grid[1]
    if prefix not in (0, prefix_tokens):
        raise ValueError(f"{where} outputs {output.shape[1]} tokens at {layer_name!r}, which are neither the "
                         f"{grid[0]}x{grid[1]} patches of a {size[0]}x{size[1]} input nor those after its "
                         f"{prefix_tokens} prefix tokens: they cannot be mapped to a grid")
    return TokenLayout(prefix, grid)
