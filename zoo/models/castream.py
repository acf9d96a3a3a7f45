"""CA-Stream: attention-based pooling beside a frozen timm ResNet or ConvNeXt.

Thesis ch. 3 (Torres Figueroa 2024; CA-Stream, CVPR-W XAI 2024). A learnable query ``q_0`` runs in a
stream beside the backbone; at each stage l it pools the stage's features by single-query cross
attention and is projected to the next stage's width (eq. 3.3, 3.7). The last query replaces global
average pooling before the backbone's own classifier, and the last attention is a saliency map that
comes with every forward pass.

The backbone is any timm ResNet or ConvNeXt, built by timm and used through its own modules. Where the
thesis is silent, the stream follows the authors' code: it taps a ResNet's stem (after its max-pool) and
four residual stages, and a ConvNeXt's stem, the downsampling layers that open stages 1 and 2, and the
last stage (``taps="stages"``: the four stage outputs instead); its linear layers start as the authors'
do for each family.
"""

from collections.abc import Callable, Iterator
from itertools import islice
from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from timm.models import ConvNeXt, ResNet, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..output import ModelOutput, check_image_batch, model_name
from ._pooled import PooledBackbone, backbone_cfg, checkpoint_filter_fn, create_backbone, create_pooled_model

__all__ = ["CAStream", "CrossAttentionBlock", "CrossAttentionStream", "StreamOutput", "checkpoint_filter_fn",
           "trunc_normal_init", "xavier_uniform_init"]


class CrossAttentionBlock(nn.Module):
    """CA_l then W_l (eq. 3.3, 3.7); with ``kv_proj`` the PROJ->CA block of eq. 3.8.

    Key and value projections are applied without projecting every token: the scores
    ``(W_K phi_i + b_K) . q`` equal ``phi_i . (W_K^T q)`` plus a constant that the softmax cancels, and
    ``sum_i a_i (W_V phi_i + b_V) = W_V (sum_i a_i phi_i) + b_V`` because the attention sums to one.
    """

    def __init__(self, dim: int, out_dim: int, kv_proj: bool = False, proj_drop: float = 0.0):
        super().__init__()
        self.scale = dim ** -0.5
        self.key = nn.Linear(dim, dim) if kv_proj else None
        self.value = nn.Linear(dim, dim) if kv_proj else None
        self.proj = nn.Linear(dim, out_dim)
        # a Dropout module costs a few microseconds of Python per call even at rate 0 (the last block's)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` [B, d], ``features`` [B, d, h, w] -> next query [B, d_out], attention [B, h*w].

        Vanilla CA is five kernels a stage: the query's scaling, the scores (one bmm), the softmax, the pooling
        (one bmm) and the projection. Both products read the tokens [B, d, h*w] where they lie: a view of the
        features, contiguous or channels-last alike.
        """
        tokens = features.flatten(2)
        if self.key is not None:
            query = query @ self.key.weight
        # scaling the query rather than the scores: d products instead of h*w, and no fp16 overflow
        attention = torch.bmm((query * self.scale).unsqueeze(1), tokens).softmax(-1)  # [B, 1, h*w]
        # a row vector times the transposed tokens: ~10x faster on CPU than tokens @ column vector
        pooled = torch.bmm(attention, tokens.mT).squeeze(1)
        if self.value is not None:
            pooled = self.value(pooled)
        return self.proj_drop(self.proj(pooled)), attention.squeeze(1)

    def project_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Each position's feature mapped as the pooled one is: [B, d, h, w] -> [B, h*w, d_out]."""
        tokens = features.flatten(2).transpose(1, 2)
        if self.value is not None:
            tokens = self.value(tokens)
        return self.proj(tokens)


def xavier_uniform_init(linear: nn.Linear) -> None:
    """The authors' ResNet streams: Xavier-uniform weights; biases keep ``nn.Linear``'s default."""
    nn.init.xavier_uniform_(linear.weight)


def trunc_normal_init(linear: nn.Linear) -> None:
    """The authors' ConvNeXt streams, as timm's ConvNeXt starts its own linear layers: weights from a
    normal of std 0.02 (timm's ``trunc_normal_``, cut at +-2), zero biases."""
    trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)


class CrossAttentionStream(nn.Module):
    """The learnable query ``q_0`` and one cross-attention block per tapped stage.

    ``widths`` are the stage widths ``d_l``; block l maps ``d_l`` to ``d_{l+1}`` and the last keeps
    ``d_L``. With ``num_queries > 1`` there is one query per class (the class-specific ablation).
    Initialisation follows the authors' code: ``q_0 ~ N(1, 1)`` and ``linear_init`` on every linear layer
    (``xavier_uniform_init`` for a ResNet, ``trunc_normal_init`` for a ConvNeXt).
    """

    def __init__(self, widths: list[int], num_queries: int = 1, kv_proj: bool = False, proj_drop: float = 0.0,
                 linear_init: Callable[[nn.Linear], None] = xavier_uniform_init):
        super().__init__()
        out_widths = widths[1:] + widths[-1:]
        self.query = nn.Parameter(torch.empty(num_queries, widths[0]))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(d, d_out, kv_proj, proj_drop if i < len(widths) - 1 else 0.0)
            for i, (d, d_out) in enumerate(zip(widths, out_widths, strict=True))
        )
        nn.init.normal_(self.query, mean=1.0, std=1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                linear_init(module)


class StreamOutput(NamedTuple):
    """Everything one pass of the stream produces."""

    query: torch.Tensor  # q_{L+1}, [B, d_L]: replaces the GAP output
    attentions: list[torch.Tensor]  # one [B, h_l, w_l] map per tapped stage, each summing to 1
    features: torch.Tensor  # F_L, the last stage's features [B, d_L, h_L, w_L]


def _resnet_taps(net: ResNet) -> list[list[nn.Module]]:
    """f_0 ... f_4 of eq. 3.5 as the authors tap: the stem up to its max-pool, then the four residual stages."""
    return [[net.conv1, net.bn1, net.act1, net.maxpool], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]


def _convnext_authors_taps(net: ConvNeXt) -> list[list[nn.Module]]:
    """f_0 ... f_3 of eq. 3.5 as the authors tap: the stem, then the downsampling layers that open stages 1
    and 2 (each the first feature at a new resolution and width), then the last stage."""
    stages = net.stages
    return [[net.stem], [stages[0], stages[1].downsample], [stages[1].blocks, stages[2].downsample],
            [stages[2].blocks, stages[3], net.norm_pre]]


def _convnext_stage_taps(net: ConvNeXt) -> list[list[nn.Module]]:
    """f_0 ... f_3 of eq. 3.5 at the four stage outputs (the stem runs before the first)."""
    return [[net.stem, net.stages[0]], [net.stages[1]], [net.stages[2]], [net.stages[3], net.norm_pre]]


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


class _Family(NamedTuple):
    """How the authors' code builds a family's stream, and the placements we offer besides."""

    taps: dict[str, Callable[[nn.Module], list[list[nn.Module]]]]  # name -> f_0 ... f_L; "authors" is the default
    linear_init: Callable[[nn.Linear], None]


_FAMILIES: dict[type, _Family] = {
    ResNet: _Family({"authors": _resnet_taps}, xavier_uniform_init),
    ConvNeXt: _Family({"authors": _convnext_authors_taps, "stages": _convnext_stage_taps}, trunc_normal_init),
}


class CAStream(PooledBackbone):
    """A timm ResNet or ConvNeXt whose global average pooling is replaced by a CA-Stream.

    ``forward(x)`` returns ``ModelOutput(logits, saliency)``, the saliency being the last block's
    attention ``[B, h_L, w_L]`` (non-negative, sums to 1 per image); every stage's attention is in
    ``forward_stream(x).attentions``. With ``return_saliency=False`` forward returns plain logits.

    Args:
        backbone: timm architecture name of a ResNet or ConvNeXt (weights come through ``pretrained``).
        num_classes: classifier outputs (the backbone's own classifier).
        in_chans: image channels.
        stream_start: first stage the stream taps (0 = S0-S4, the default; L = S_L-S_L only).
        kv_proj: PROJ->CA blocks with key/value projections (eq. 3.8) instead of vanilla CA.
        class_specific: one query per class; at training the target's, at inference the class the
            GAP baseline predicts (thesis §3.6.2).
        taps: where the stream reads the backbone (the points of eq. 3.5): ``"authors"``, as the authors'
            code (ResNet: stem after its max-pool, four stages; ConvNeXt: stem, the downsampling layers
            opening stages 1 and 2, stage 3), or for a ConvNeXt ``"stages"``, its four stage outputs.
            Saved with the model's arguments, so a checkpoint reloads with its own taps.
        proj_drop_rate: dropout after each projection but the last.
        drop_rate: dropout before the classifier.
        return_saliency: forward returns ``ModelOutput`` (default) or plain logits.
        **backbone_kwargs: passed to ``timm.create_model`` for the backbone.
    """

    checkpoint_options = "stream options (stream_start, kv_proj, class_specific)"

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        in_chans: int = 3,
        stream_start: int = 0,
        kv_proj: bool = False,
        class_specific: bool = False,
        taps: str = "authors",
        proj_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        return_saliency: bool = True,
        **backbone_kwargs,
    ):
        net = create_backbone("CA-Stream", backbone, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                              **backbone_kwargs)
        family = next(fam for cls, fam in _FAMILIES.items() if isinstance(net, cls))
        if taps not in family.taps:
            options = ", ".join(map(repr, family.taps))
            raise ValueError(f"taps for a {type(net).__name__} backbone must be one of {options}, got {taps!r}")
        widths = [info["num_chs"] for info in net.feature_info]
        if not 0 <= stream_start < len(widths):
            raise ValueError(f"stream_start must be a stage index in 0..{len(widths) - 1}, got {stream_start}")
        if class_specific and num_classes < 1:
            raise ValueError("a class-specific stream needs num_classes >= 1 (one query per class)")

        super().__init__(net, in_chans, return_saliency)
        self.stream = CrossAttentionStream(widths[stream_start:], num_classes if class_specific else 1, kv_proj,
                                           proj_drop_rate, family.linear_init)
        self._stages = family.taps[taps](net)  # plain list: these modules are registered under ``backbone``
        self.stream_start = stream_start
        self.taps = taps
        # timm >= 1.0.31 writes a model's ``_model_args`` to config.json in save_for_hf: the taps travel with
        # the checkpoint even when they are the default (older timm writes only the model_args it is given)
        self._model_args = {**getattr(self, "_model_args", {}), "taps": taps}
        self.class_specific = class_specific
        self.grad_checkpointing = False

    # --- the stream ---------------------------------------------------------------------------

    def _stage_features(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self._stages:
            x = checkpoint(_run, stage, x, use_reentrant=False) if recompute else _run(stage, x)
            yield x

    def forward_stream(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> StreamOutput:
        """Backbone and stream together: final query, every stage's attention, last features."""
        check_image_batch(x, self.in_chans, model_name(self), self.min_input_size)
        features = self._stage_features(x)
        if self.class_specific:
            features = list(features)
            query = self.stream.query[self._query_classes(features[-1], targets)]
        else:
            query = self.stream.query.expand(x.shape[0], -1)
        attentions = []
        for block, feats in zip(self.stream.blocks, islice(features, self.stream_start, None), strict=True):
            query, attention = block(query, feats)
            attentions.append(attention.unflatten(1, feats.shape[-2:]))
        return StreamOutput(query, attentions, feats)

    def _query_classes(self, last_features: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is not None:
            return targets
        if self.training:
            raise ValueError("a class-specific CA-Stream trains with the target's query: call model(x, targets)")
        return self.backbone.forward_head(last_features).argmax(-1)

    # --- timm model interface (the rest is PooledBackbone's) -------------------------------------

    def pool_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's last query [B, d_L] (the class token of ``forward_features``) and the last features."""
        out = self.forward_stream(x)
        return out.query, out.features

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput | torch.Tensor:
        """Logits and the last attention map; ``targets`` only matter for a class-specific stream."""
        out = self.forward_stream(x, targets)
        logits = self._classify(out.query)
        return ModelOutput(logits, out.attentions[-1]) if self.return_saliency else logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages in the backward pass instead of storing their activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 removes it); pooling is the stream's and cannot change."""
        if global_pool is not None:
            raise ValueError("CA-Stream replaces global pooling; global_pool cannot be set")
        if self.class_specific:
            if num_classes < 1:
                raise ValueError("a class-specific stream needs num_classes >= 1 (one query per class)")
            query = self.stream.query
            self.stream.query = nn.Parameter(torch.empty(num_classes, query.shape[1], device=query.device,
                                                         dtype=query.dtype).normal_(1.0, 1.0))
        super().reset_classifier(num_classes)

    # --- explanation --------------------------------------------------------------------------

    def contribution_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Class-specific map [B, h_L, w_L] whose sum plus the classifier bias is the target logit.

        The last query is ``q = sum_i a_i z_i`` with ``z_i = W_L phi_i + b_L`` because the attention sums
        to one, so any affine head splits the logit over positions: ``y_c = sum_i a_i g_c(z_i) + b_c``.
        For a ResNet head (linear classifier) each term is exactly that position's share. A ConvNeXt
        head normalises ``q`` first; the norm is applied to every ``z_i`` with the statistics of ``q``
        (the affine map the norm is at ``q``), so the sum is still exact, but a term is not the logit
        position i would give alone. ``target`` defaults to the predicted class. Eval mode only.
        """
        if self.training:
            raise RuntimeError("contribution_map decomposes the inference logit: call model.eval() first")
        classifier = self.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"contribution maps need a linear classifier, this model has {type(classifier).__name__}")
        out = self.forward_stream(x)
        if target is None:
            target = self._classify(out.query).argmax(-1)
        tokens = self._head_norm_at(self.stream.blocks[-1].project_tokens(out.features), out.query)
        scores = torch.einsum("bpd,bd->bp", tokens, classifier.weight[target])
        return out.attentions[-1] * scores.unflatten(1, out.features.shape[-2:])

    def _head_norm_at(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        head = getattr(self.backbone, "head", None)
        if head is None:  # ResNet: pooling and dropout, then the classifier
            return tokens
        if not isinstance(head.pre_logits, nn.Identity):
            raise ValueError("contribution maps need the classifier right after the head norm; this head has an MLP")
        norm = head.norm
        if isinstance(norm, nn.Identity):
            return tokens
        mean = query.mean(-1, keepdim=True).unsqueeze(1)
        inv_std = torch.rsqrt(query.var(-1, unbiased=False, keepdim=True) + norm.eps).unsqueeze(1)
        return (tokens - mean) * inv_std * norm.weight + norm.bias


def _create_castream(variant: str, pretrained: bool = False, **kwargs) -> CAStream:
    return create_pooled_model(CAStream, variant, pretrained, **kwargs)


def _cfg(name: str, backbone_weights: str, **kwargs) -> dict:
    """The stream is trained with its backbone's data config; the classifier sits in the backbone."""
    return backbone_cfg(name, backbone_weights, paper_name="CA-Stream: Attention-based pooling for interpretable "
                        "image recognition", notes=(f"stream trained on top of frozen {backbone_weights}",), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_castream.in1k": _cfg("resnet18_castream.in1k", "resnet18.tv_in1k"),
    "resnet34_castream.in1k": _cfg("resnet34_castream.in1k", "resnet34.tv_in1k"),
    "resnet50_castream.in1k": _cfg("resnet50_castream.in1k", "resnet50.tv_in1k"),
    "resnet101_castream.in1k": _cfg("resnet101_castream.in1k", "resnet101.tv_in1k"),
    "convnext_tiny_castream.in1k": _cfg("convnext_tiny_castream.in1k", "convnext_tiny.fb_in1k"),
    "convnext_small_castream.in1k": _cfg("convnext_small_castream.in1k", "convnext_small.fb_in1k"),
    "convnext_base_castream.in1k": _cfg("convnext_base_castream.in1k", "convnext_base.fb_in1k"),
})


@register_model
def resnet18_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ResNet-18 with a CA-Stream over the stem and four stages (thesis Table 3.3)."""
    model_args = dict(backbone="resnet18")
    return _create_castream("resnet18_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ResNet-34 with a CA-Stream over the stem and four stages."""
    model_args = dict(backbone="resnet34")
    return _create_castream("resnet34_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ResNet-50 with a CA-Stream over the stem and four stages (thesis Tables 3.3-3.6)."""
    model_args = dict(backbone="resnet50")
    return _create_castream("resnet50_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ResNet-101 with a CA-Stream over the stem and four stages."""
    model_args = dict(backbone="resnet101")
    return _create_castream("resnet101_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ConvNeXt-T with a CA-Stream tapped as the authors' code taps a ConvNeXt."""
    model_args = dict(backbone="convnext_tiny")
    return _create_castream("convnext_tiny_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_small_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ConvNeXt-S with a CA-Stream tapped as the authors' code taps a ConvNeXt (thesis Table 3.3)."""
    model_args = dict(backbone="convnext_small")
    return _create_castream("convnext_small_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_base_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """ConvNeXt-B with a CA-Stream tapped as the authors' code taps a ConvNeXt (thesis Table 3.3)."""
    model_args = dict(backbone="convnext_base")
    return _create_castream("convnext_base_castream", pretrained, **dict(model_args, **kwargs))
