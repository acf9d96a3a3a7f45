"""CA-Stream: attention-based pooling beside a frozen timm ResNet, ConvNeXt or RegNet.

Thesis ch. 3 (Torres Figueroa 2024; CA-Stream, CVPR-W XAI 2024). A learnable query ``q_0`` runs in a
stream beside the backbone; at each stage l it pools the stage's features by single-query cross
attention and is projected to the next stage's width (eq. 3.3, 3.7). The last query replaces global
average pooling before the backbone's own classifier, and the last attention is a saliency map that
comes with every forward pass.

The backbone is any timm ResNet, ConvNeXt or RegNet, built by timm and used through its own modules. Where the
thesis is silent, the stream follows the authors' code: it taps a ResNet's stem (after its max-pool) and
four residual stages, and a ConvNeXt's stem, the downsampling layers that open stages 1 and 2, and the
last stage; its linear layers start as the authors' do for each family. Elsewhere (``taps="stages"``, the
only taps of a RegNet) it reads timm's feature points, the backbone's ``feature_info``, through the backbone's
own ``forward_intermediates``: a timm CNN that has both carries a stream with one line in ``_FAMILIES``.
"""

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import torch
from timm.layers import NormMlpClassifierHead, trunc_normal_
from timm.models import ConvNeXt, RegNet, ResNet, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..output import ModelOutput
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
        attention = self.scores(query, features).softmax(-1)  # [B, 1, h*w]
        # a row vector times the transposed tokens: ~10x faster on CPU than tokens @ column vector
        pooled = torch.bmm(attention, tokens.mT).squeeze(1)
        if self.value is not None:
            pooled = self.value(pooled)
        return self.proj_drop(self.proj(pooled)), attention.squeeze(1)

    def scores(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The attention's scores before the softmax [B, 1, h*w] (eq. 3.1; PROJ->CA, eq. 3.8: without the key
        bias's term, the same at every position, which the softmax cancels)."""
        if self.key is not None:
            query = query @ self.key.weight
        # scaling the query rather than the scores: d products instead of h*w, and no fp16 overflow
        return torch.bmm((query * self.scale).unsqueeze(1), features.flatten(2))

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


class _Run(NamedTuple):
    """Consecutive modules of the backbone, after which it is tapped by the stream, at one of timm's feature points
    (``feature_info``), or both."""

    modules: list[nn.Module]
    tap: bool = True
    feature: bool = True


def _resnet_taps(net: ResNet) -> list[_Run]:
    """f_0 ... f_4 of eq. 3.5 as the authors tap: the stem after its max-pool (timm's first feature point is before
    it), then the four residual stages."""
    layers = (net.layer1, net.layer2, net.layer3, net.layer4)
    return [_Run([net.conv1, net.bn1, net.act1], tap=False), _Run([net.maxpool], feature=False),
            *(_Run([layer]) for layer in layers)]


def _convnext_authors_taps(net: ConvNeXt) -> list[_Run]:
    """f_0 ... f_3 of eq. 3.5 as the authors tap: the stem, then the downsampling layers that open stages 1
    and 2 (each the first feature at a new resolution and width), then the last stage; timm's feature points are
    the four stage outputs."""
    stages = net.stages
    return [_Run([net.stem], feature=False), _Run([stages[0]], tap=False),
            _Run([stages[1].downsample], feature=False), _Run([stages[1].blocks], tap=False),
            _Run([stages[2].downsample], feature=False), _Run([stages[2].blocks], tap=False),
            _Run([stages[3]], tap=False), _Run([net.norm_pre], feature=False)]


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


class _Family(NamedTuple):
    """How the authors' code builds a family's stream, and the placements we offer besides."""

    # name -> the runs of f_0 ... f_L, or None for timm's feature points (the last one as forward_features gives
    # it); the first name is the default
    taps: dict[str, Callable[[nn.Module], list[_Run]] | None]
    linear_init: Callable[[nn.Linear], None]


_FAMILIES: dict[type, _Family] = {
    ResNet: _Family({"authors": _resnet_taps}, xavier_uniform_init),
    ConvNeXt: _Family({"authors": _convnext_authors_taps, "stages": None}, trunc_normal_init),
    RegNet: _Family({"stages": None}, xavier_uniform_init),
}


def _family(net: nn.Module) -> _Family:
    return next(family for cls, family in _FAMILIES.items() if isinstance(net, cls))


def _runs(net: nn.Module, taps: str) -> list[_Run] | None:
    split = _family(net).taps[taps]
    return split(net) if split else None


class CAStream(PooledBackbone):
    """A timm ResNet, ConvNeXt or RegNet whose global average pooling is replaced by a CA-Stream.

    ``forward(x)`` returns ``ModelOutput(logits, saliency)``, the saliency being the last block's
    attention ``[B, h_L, w_L]`` (non-negative, sums to 1 per image); every stage's attention is in
    ``forward_stream(x).attentions``. With ``return_saliency=False`` forward returns plain logits.

    Args:
        backbone: timm architecture name of a ResNet, ConvNeXt or RegNet (weights come through ``pretrained``).
        num_classes: classifier outputs (the backbone's own classifier).
        in_chans: image channels.
        stream_start: first stage the stream taps (0 = S0-S4, the default; L = S_L-S_L only).
        kv_proj: PROJ->CA blocks with key/value projections (eq. 3.8) instead of vanilla CA.
        class_specific: one query per class; at training the target's, at inference the class the
            GAP baseline predicts (thesis §3.6.2).
        taps: where the stream reads the backbone (the points of eq. 3.5): ``"authors"``, as the authors'
            code (ResNet: stem after its max-pool, four stages; ConvNeXt: stem, the downsampling layers
            opening stages 1 and 2, stage 3), or ``"stages"``, timm's feature points (``feature_info``; for a
            ConvNeXt its four stage outputs, for a RegNet its stem and four stages). None: ``"authors"`` where
            the family has them, else ``"stages"``. Saved with the model's arguments, so a checkpoint reloads
            with its own taps.
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
        taps: str | None = None,
        proj_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        return_saliency: bool = True,
        **backbone_kwargs,
    ):
        net = create_backbone("CA-Stream", backbone, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                              **backbone_kwargs)
        family = _family(net)
        taps = taps or next(iter(family.taps))
        if taps not in family.taps:
            options = ", ".join(map(repr, family.taps))
            raise ValueError(f"taps for a {type(net).__name__} backbone must be one of {options}, got {taps!r}")
        widths = [info["num_chs"] for info in net.feature_info[:-1]] + [net.num_features]
        if not 0 <= stream_start < len(widths):
            raise ValueError(f"stream_start must be a stage index in 0..{len(widths) - 1}, got {stream_start}")
        if class_specific and num_classes < 1:
            raise ValueError("a class-specific stream needs num_classes >= 1 (one query per class)")

        super().__init__(net, in_chans, drop_rate, return_saliency)
        self.stream = CrossAttentionStream(widths[stream_start:], num_classes if class_specific else 1, kv_proj,
                                           proj_drop_rate, family.linear_init)
        self._runs = _runs(net, taps)  # plain list: these modules are registered under ``backbone``
        self.stream_start = stream_start
        self.taps = taps
        # timm >= 1.0.31 writes a model's ``_model_args`` to config.json in save_for_hf: the taps travel with
        # the checkpoint even when they are the default (older timm writes only the model_args it is given)
        self._model_args = {**getattr(self, "_model_args", {}), "taps": taps}
        self.class_specific = class_specific
        self.grad_checkpointing = False

    # --- the stream ---------------------------------------------------------------------------

    def _walk(self, x: torch.Tensor, norm: bool = False) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """One pass of the backbone, step by step: the stream's tap and timm's feature point there (None where
        there is none)."""
        if self._runs is None:  # timm's feature points; the last tap is what reaches the head
            final, features = self.backbone.forward_intermediates(x, norm=norm)
            yield from zip([*features[:-1], final], features, strict=True)
            return
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for run in self._runs:
            x = checkpoint(_run, run.modules, x, use_reentrant=False) if recompute else _run(run.modules, x)
            yield (x if run.tap else None), (x if run.feature else None)

    def _stage_features(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """f_0 ... f_L, the features the stream taps."""
        return (tap for tap, _ in self._walk(x) if tap is not None)

    def forward_stream(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> StreamOutput:
        """Backbone and stream together: final query, every stage's attention, last features."""
        self._check_input(x)
        return self._stream(islice(self._stage_features(x), self.stream_start, None), x.shape[0], targets)

    def _stream(self, taps: Iterable[torch.Tensor], batch: int, targets: torch.Tensor | None = None) -> StreamOutput:
        if self.class_specific:
            taps = list(taps)
            query = self.stream.query[self._query_classes(taps[-1], targets)]
        else:
            query = self.stream.query.expand(batch, -1)
        attentions = []
        for block, feats in zip(self.stream.blocks, taps, strict=True):
            query, attention = block(query, feats)
            attentions.append(attention.unflatten(1, feats.shape[-2:]))
        return StreamOutput(query, attentions, feats)

    def _stream_intermediates(self, x: torch.Tensor, indices: int | list[int] | None,
                              norm: bool) -> tuple[StreamOutput, list[int], list[torch.Tensor]]:
        """The stream's output and timm's feature points at ``indices`` (absolute, and the features), one pass."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        steps = list(self._walk(x, norm))
        taps = [tap for tap, _ in steps if tap is not None]
        features = [feature for _, feature in steps if feature is not None]
        if norm and self._runs is not None:  # the authors' last tap is the last stage's output through its norm
            features[-1] = taps[-1]
        out = self._stream(taps[self.stream_start:], x.shape[0])
        return out, take_indices, [features[index] for index in take_indices]

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

    def pool_intermediates(self, x: torch.Tensor, indices: int | list[int] | None,
                           norm: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``pool_features(x)`` and timm's feature points at ``indices``, from one pass."""
        out, _, intermediates = self._stream_intermediates(x, indices, norm)
        return out.query, out.features, intermediates

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_attentions: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's feature API, as ``PooledBackbone.forward_intermediates``: the backbone's features at its
        ``feature_info`` points. With ``return_attentions`` each intermediate is a pair (features, the stream's
        attention [B, h, w] at that stage, as in ``forward_stream(x).attentions``), as timm's ViTs pair theirs with
        prefix tokens; the stream then runs over the whole backbone (``stop_early`` does not apply). The attention
        is over the stream's tap of that stage, which the authors' taps place elsewhere than timm's feature point:
        a ResNet's stem after its max-pool (half the resolution), a ConvNeXt's stem instead of stage 0's output and
        the downsampling layers that open stages 1 and 2 instead of those stages' outputs (same shapes).
        """
        if not return_attentions:
            return super().forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)
        self._check_intermediates_input(x, output_fmt)
        out, take_indices, intermediates = self._stream_intermediates(x, indices, norm)
        if min(take_indices) < self.stream_start:
            raise ValueError(f"the stream starts at stage {self.stream_start}: no attention at stage "
                             f"{min(take_indices)} (indices={indices!r})")
        pairs = [(features, out.attentions[index - self.stream_start])
                 for index, features in zip(take_indices, intermediates, strict=True)]
        return pairs if intermediates_only else (self._tokens(out.query, out.features), pairs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        # a kept stream reads the pruned backbone (its pruning may replace tapped modules); none: no runs left
        self._runs = _runs(self.backbone, self.taps) if hasattr(self, "stream") else []
        return take_indices

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput | torch.Tensor:
        """Logits and the last attention map; ``targets`` only matter for a class-specific stream."""
        out = self.forward_stream(x, targets)
        logits = self._classify(out.query)
        return ModelOutput(logits, out.attentions[-1]) if self.return_saliency else logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages in the backward pass instead of storing their activations (timm's own
        checkpointing where the stream reads timm's feature points)."""
        if self._runs is None:
            self.backbone.set_grad_checkpointing(enable)
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
        if not isinstance(head, NormMlpClassifierHead):  # ResNet, RegNet: pooling and dropout, then the classifier
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
    "regnety_016_castream.in1k": _cfg("regnety_016_castream.in1k", "regnety_016.tv2_in1k"),
    "regnety_032_castream.in1k": _cfg("regnety_032_castream.in1k", "regnety_032.ra_in1k"),
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


@register_model
def regnety_016_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """RegNetY-1.6GF with a CA-Stream over timm's feature points: the stem and four stages."""
    model_args = dict(backbone="regnety_016")
    return _create_castream("regnety_016_castream", pretrained, **dict(model_args, **kwargs))


@register_model
def regnety_032_castream(pretrained: bool = False, **kwargs) -> CAStream:
    """RegNetY-3.2GF with a CA-Stream over timm's feature points: the stem and four stages."""
    model_args = dict(backbone="regnety_032")
    return _create_castream("regnety_032_castream", pretrained, **dict(model_args, **kwargs))
