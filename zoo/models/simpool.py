"""SimPool: timm's attention pooling in place of a frozen timm ResNet's, ConvNeXt's or RegNet's global average
pooling.

Psomas et al., "Keep It SimPool: Who Said Supervised Transformers Suffer from Attention Deficit?", ICCV 2023. The
GAP of the last stage's features is the query; the LayerNorm'd patches are the values and, through a linear layer,
the keys; the pooled vector is their attention-weighted sum (a single query, softmax over the h*w positions).

The pooling is timm's own ``timm.layers.SimPool2d``, called as it is: the pooled features that reach the
backbone's own classifier (for ConvNeXt, its head norm first, as CA-Stream's pooled query) come from its forward.
That forward does not return its attention, so ``simpool_attention`` computes it from the module's own layers and
constants (``norm``, ``q``, ``k``, ``q_norm``, ``k_norm``, ``scale``, ``num_heads``); ``tests/test_simpool.py``
checks that this attention, applied to the module's values, gives the module's output. It is the saliency that
comes with every forward pass, a baseline for CA-Stream (same backbones, same frozen-backbone recipe).
"""

from typing import NamedTuple

import torch
from timm.layers import SimPool2d
from timm.models import generate_default_cfgs, register_model

from ..output import ModelOutput
from ._pooled import PooledBackbone, backbone_cfg, create_backbone, create_pooled_model

__all__ = ["PoolOutput", "SimPool", "simpool_attention"]


def simpool_attention(pool: SimPool2d, features: torch.Tensor) -> torch.Tensor:
    """The attention [B, num_heads, h*w] with which ``pool``'s forward pools ``features`` [B, C, h, w].

    Each head's row is ``softmax(q_norm(q(GAP)) * scale . k_norm(k(norm(x_i))))`` over the positions i, from the
    module's own layers; with ``gamma`` set the same weights average the power-normalised values, so the map does
    not depend on gamma.
    """
    batch, channels = features.shape[:2]
    tokens = features.flatten(2).transpose(1, 2)  # [B, N, C]
    query = pool.q(tokens.mean(1, keepdim=True)).reshape(batch, 1, pool.num_heads, pool.head_dim).transpose(1, 2)
    keys = pool.k(pool.norm(tokens)).reshape(batch, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    query, keys = pool.q_norm(query), pool.k_norm(keys)
    return ((query * pool.scale) @ keys.transpose(-2, -1)).softmax(-1).squeeze(2)


class PoolOutput(NamedTuple):
    """Everything one pass of the pooling produces."""

    pooled: torch.Tensor  # SimPool2d's output [B, C]: replaces the GAP output
    attention: torch.Tensor  # each head's attention [B, num_heads, h, w], summing to 1 per head
    features: torch.Tensor  # the last stage's features [B, C, h, w]


class SimPool(PooledBackbone):
    """A timm ResNet, ConvNeXt or RegNet whose global average pooling is replaced by timm's ``SimPool2d`` (Psomas et
    al. 2023), in front of the backbone's own classifier.

    ``forward(x)`` returns ``ModelOutput(logits, saliency)``, the saliency being SimPool's attention over the last
    stage's positions ``[B, h, w]`` (non-negative, sums to 1 per image); with several heads, the mean of the
    heads' attentions (each head pools its own channels, so no single map is the one used; every head's is in
    ``forward_pool(x).attention``). With ``return_saliency=False`` forward returns plain logits and computes no
    map.

    Args:
        backbone: timm architecture name of a ResNet, ConvNeXt or RegNet (weights come through ``pretrained``).
        num_classes: classifier outputs (the backbone's own classifier).
        in_chans: image channels.
        num_heads, qkv_bias, qk_norm, gamma: ``SimPool2d``'s options (timm's defaults: one head, no biases, no
            query/key norm, no power normalisation of the values).
        drop_rate: dropout before the classifier.
        return_saliency: forward returns ``ModelOutput`` (default) or plain logits.
        **backbone_kwargs: passed to ``timm.create_model`` for the backbone.
    """

    checkpoint_options = "pooling options (num_heads, qkv_bias, qk_norm)"

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        in_chans: int = 3,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        gamma: float | None = None,
        drop_rate: float = 0.0,
        return_saliency: bool = True,
        **backbone_kwargs,
    ):
        net = create_backbone("SimPool", backbone, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                              **backbone_kwargs)
        if num_heads < 1 or net.num_features % num_heads:
            raise ValueError(f"num_heads must divide the last stage's {net.num_features} channels, got {num_heads}")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be positive (or None: no power normalisation), got {gamma}")
        super().__init__(net, in_chans, drop_rate, return_saliency)
        self.pool = SimPool2d(net.num_features, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, gamma=gamma)

    def _last_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.backbone.forward_features(x)

    def forward_pool(self, x: torch.Tensor) -> PoolOutput:
        """Backbone and pooling: SimPool2d's output, every head's attention and the last features."""
        features = self._last_features(x)
        attention = simpool_attention(self.pool, features).unflatten(-1, features.shape[-2:])
        return PoolOutput(self.pool(features), attention, features)

    def pool_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SimPool2d's output [B, C] (the class token of ``forward_features``) and the last features."""
        features = self._last_features(x)
        return self.pool(features), features

    def pool_intermediates(self, x: torch.Tensor, indices: int | list[int] | None,
                           norm: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``pool_features(x)`` and the backbone's features at ``indices``, from one pass."""
        features, intermediates = self.backbone.forward_intermediates(x, indices, norm)
        return self.pool(features), features, intermediates

    def forward(self, x: torch.Tensor) -> ModelOutput | torch.Tensor:
        """Logits and SimPool's attention map (the heads' mean)."""
        if not self.return_saliency:
            return self._classify(self.pool_features(x)[0])
        out = self.forward_pool(x)
        return ModelOutput(self._classify(out.pooled), out.attention.mean(1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages in the backward pass instead of storing their activations (timm's own)."""
        self.backbone.set_grad_checkpointing(enable)


def _create_simpool(variant: str, pretrained: bool = False, **kwargs) -> SimPool:
    return create_pooled_model(SimPool, variant, pretrained, **kwargs)


def _cfg(name: str, backbone_weights: str, **kwargs) -> dict:
    """SimPool is trained with its backbone's data config; the classifier sits in the backbone."""
    return backbone_cfg(name, backbone_weights, paper_name="Keep It SimPool: Who Said Supervised Transformers "
                        "Suffer from Attention Deficit?", paper_ids="arXiv:2309.06891",
                        notes=(f"SimPool trained on top of frozen {backbone_weights}",), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_simpool.in1k": _cfg("resnet18_simpool.in1k", "resnet18.tv_in1k"),
    "resnet34_simpool.in1k": _cfg("resnet34_simpool.in1k", "resnet34.tv_in1k"),
    "resnet50_simpool.in1k": _cfg("resnet50_simpool.in1k", "resnet50.tv_in1k"),
    "resnet101_simpool.in1k": _cfg("resnet101_simpool.in1k", "resnet101.tv_in1k"),
    "convnext_tiny_simpool.in1k": _cfg("convnext_tiny_simpool.in1k", "convnext_tiny.fb_in1k"),
    "convnext_small_simpool.in1k": _cfg("convnext_small_simpool.in1k", "convnext_small.fb_in1k"),
    "convnext_base_simpool.in1k": _cfg("convnext_base_simpool.in1k", "convnext_base.fb_in1k"),
    "regnety_016_simpool.in1k": _cfg("regnety_016_simpool.in1k", "regnety_016.tv2_in1k"),
    "regnety_032_simpool.in1k": _cfg("regnety_032_simpool.in1k", "regnety_032.ra_in1k"),
})


@register_model
def resnet18_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ResNet-18 with SimPool in place of global average pooling."""
    model_args = dict(backbone="resnet18")
    return _create_simpool("resnet18_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ResNet-34 with SimPool in place of global average pooling."""
    model_args = dict(backbone="resnet34")
    return _create_simpool("resnet34_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ResNet-50 with SimPool in place of global average pooling."""
    model_args = dict(backbone="resnet50")
    return _create_simpool("resnet50_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ResNet-101 with SimPool in place of global average pooling."""
    model_args = dict(backbone="resnet101")
    return _create_simpool("resnet101_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ConvNeXt-T with SimPool in place of global average pooling (before the head norm)."""
    model_args = dict(backbone="convnext_tiny")
    return _create_simpool("convnext_tiny_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_small_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ConvNeXt-S with SimPool in place of global average pooling (before the head norm)."""
    model_args = dict(backbone="convnext_small")
    return _create_simpool("convnext_small_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_base_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """ConvNeXt-B with SimPool in place of global average pooling (before the head norm)."""
    model_args = dict(backbone="convnext_base")
    return _create_simpool("convnext_base_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def regnety_016_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """RegNetY-1.6GF with SimPool in place of global average pooling."""
    model_args = dict(backbone="regnety_016")
    return _create_simpool("regnety_016_simpool", pretrained, **dict(model_args, **kwargs))


@register_model
def regnety_032_simpool(pretrained: bool = False, **kwargs) -> SimPool:
    """RegNetY-3.2GF with SimPool in place of global average pooling."""
    model_args = dict(backbone="regnety_032")
    return _create_simpool("regnety_032_simpool", pretrained, **dict(model_args, **kwargs))
