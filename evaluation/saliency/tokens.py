"""A target layer's output as feature maps ``[B, K, h, w]``, so that every CAM method and Opti-CAM run on
convolutional, channels-last and token layers with no user-written reshape.

- 4-D outputs are maps ``[B, C, h, w]`` or channels-last maps ``[B, h, w, C]`` (the stages of timm's Swin,
  SwinV2 and MambaOut). The model says which: timm sets ``output_fmt = "NHWC"`` on channels-last models
  (default: NCHW). A layer whose output does not fit that format is probed: the format whose spatial
  dimensions one stride makes of the input's size is the one used (an NCHW convolution inside a MambaOut
  block; torchvision's Swin, which declares nothing).
- A token layer of a timm ViT / DeiT outputs ``[B, N, C]`` with ``N = P + h * w``: the ``P =
  num_prefix_tokens`` leading tokens (class, distillation, registers) then the patches in raster order. The
  grid ``(h, w)`` comes from the model's patch embedding and the actual input size, so any size the model
  accepts works. The map of channel k is the k-th feature of every patch token (thesis §3.2, eq. 3.2: ``F``
  reshaped from ``p x d`` to ``w x h x d``); prefix tokens are no part of it.
- A Hiera block outputs its tokens in mask-unit order; the model's own ``reroll`` (which puts a block's
  tokens back on their grid) applied to the token indices gives their places.
"""

import math
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from torch import nn


def has_patch_grid(net: nn.Module) -> bool:
    """Whether ``net`` embeds patches with timm's ``PatchEmbed``, which ``patch_grid`` reads."""
    return isinstance(getattr(net, "patch_embed", None), PatchEmbed)


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


class ChannelsLastLayout:
    """A channels-last layer's output ``[B, h, w, K]``."""

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        return output.permute(0, 3, 1, 2)

    def to_output(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return maps.permute(0, 2, 3, 1).contiguous()  # contiguous as the layer's own output, for later .view()s


@dataclass(frozen=True)
class TokenLayout:
    """A token layer's output ``[B, prefix + h * w, K]``: ``prefix`` leading tokens, then the patch grid, in
    raster order or, given ``order``, with the token at ``order[i]`` in the i-th place of the grid."""

    prefix: int
    grid: tuple[int, int]
    order: torch.Tensor | None = None

    def to_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, K]`` -> ``[B, K, h, w]``, prefix tokens dropped."""
        patches = tokens[:, self.prefix:]
        if self.order is not None:
            patches = patches[:, self.order]
        return patches.transpose(1, 2).unflatten(2, self.grid)

    def to_output(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, K, h, w]`` back into tokens, behind the prefix tokens of the layer's own ``output``."""
        patches = maps.flatten(2).transpose(1, 2)
        if self.order is not None:
            patches = patches[:, self.order.argsort()]
        return torch.cat([output[:, :self.prefix], patches], 1)


def fits(grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether one stride s takes an input of ``size`` (H, W) to ``grid`` (h, w), rounding down or up: h is
    floor or ceil of H / s when H / (h + 1) < s < H / (h - 1), and the same s must hold for w."""
    low = max(length / (cells + 1) for cells, length in zip(grid, size, strict=True))
    high = min(length / (cells - 1) if cells > 1 else math.inf for cells, length in zip(grid, size, strict=True))
    return low < high


def map_layout(net: nn.Module, output: torch.Tensor, size: tuple[int, int]) -> MapLayout | ChannelsLastLayout:
    """The format of a 4-D ``output`` for an input of ``size``: the model's (its ``output_fmt``, default NCHW)
    unless the spatial dimensions of only the other one fit the input."""
    channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"
    if fits(output.shape[2:], size) != fits(output.shape[1:3], size):
        channels_last = fits(output.shape[1:3], size)
    return ChannelsLastLayout() if channels_last else MapLayout()


def hiera_layout(net: nn.Module, layer: nn.Module, tokens: torch.Tensor, where: str) -> TokenLayout:
    """Where each of a Hiera block's ``tokens`` lies on its grid: the model's ``reroll`` of that block applied
    to the token indices; a ValueError for any other token layer of a Hiera, whose order it does not know."""
    block = next((i for i, module in enumerate(net.blocks) if module is layer), None)
    if block is None:
        raise ValueError(f"{where} outputs tokens in Hiera's mask-unit order, which only a block's output can be "
                         f"put back on its grid; explain a block, e.g. the default blocks.{len(net.blocks) - 1}")
    indices = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1, 1)
    order = net.reroll(indices, block)[0, ..., 0]
    return TokenLayout(0, tuple(order.shape), order.flatten())


def layer_layout(net: nn.Module, layer: nn.Module, output, size: tuple[int, int], model_name: str,
                 layer_name: str) -> MapLayout | ChannelsLastLayout | TokenLayout:
    """How the output of ``layer`` (its dotted name ``layer_name``) of ``net`` holds its feature maps for an
    input of ``size``, or a ValueError naming the model and the layer."""
    where = f"layer {type(layer).__name__} of {model_name}"
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return map_layout(net, output, size)
    if not isinstance(output, torch.Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{where} does not output a feature map [B, C, h, w] or tokens [B, N, C] (got {shape} "
                         f"from {layer_name!r}); choose a spatial layer with layer=")
    if hasattr(net, "reroll"):
        return hiera_layout(net, layer, output, f"{where} ({layer_name!r})")
    if not has_patch_grid(net):
        raise ValueError(f"{where} outputs tokens {tuple(output.shape)} at {layer_name!r}, but {model_name} has no "
                         f"patch embedding (timm's PatchEmbed at patch_embed) to place them on a grid; choose a "
                         f"layer with feature maps [B, C, h, w]")
    grid = patch_grid(net, size, model_name)
    prefix_tokens = getattr(net, "num_prefix_tokens", 0)
    prefix = output.shape[1] - grid[0] * grid[1]
    if prefix not in (0, prefix_tokens):
        raise ValueError(f"{where} outputs {output.shape[1]} tokens at {layer_name!r}, which are neither the "
                         f"{grid[0]}x{grid[1]} patches of a {size[0]}x{size[1]} input nor those after its "
                         f"{prefix_tokens} prefix tokens: they cannot be mapped to a grid")
    return TokenLayout(prefix, grid)
