"""What the zoo's pooling families (CA-Stream, SimPool) share: a timm ResNet, ConvNeXt or RegNet whose global average
pooling is replaced by a learned pooling in front of the backbone's own classifier, trained with the backbone frozen.

``PooledBackbone`` is their base class: the backbone (classifier included) under ``backbone``, the timm interface
that does not depend on how the features are pooled (timm's feature API included: ``forward_intermediates``,
``prune_intermediate_layers``, ``features_only=True``, on the backbone's own feature points), and backbone
freezing. ``checkpoint_filter_fn`` loads a full checkpoint or a backbone-only timm one into any of them,
``create_pooled_model`` builds a registered variant and ``backbone_cfg`` is a variant's pretrained config: its
backbone weights' data config.
"""

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import timm
import torch
from timm.models import ConvNeXt, RegNet, ResNet, get_pretrained_cfg
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from ..hub import checkpoint_mismatch, hub_id
from ..output import check_image_batch, model_name
from ._builder import build_zoo_model

__all__ = ["BACKBONES", "PooledBackbone", "backbone_cfg", "checkpoint_filter_fn", "create_backbone",
           "create_pooled_model"]

BACKBONES = (ResNet, ConvNeXt, RegNet)  # the timm families whose global average pooling a zoo pooling replaces


def create_backbone(family: str, name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, refused with a ValueError unless one of ``BACKBONES``, or when
    ``kwargs`` set ``global_pool``: the family's pooling replaces it."""
    global_pool = kwargs.pop("global_pool", None)
    if global_pool is not None:
        raise ValueError(f"{family} replaces the backbone's global pooling with its own: global_pool={global_pool!r} "
                         "cannot be set (leave it out)")
    net = timm.create_model(name, **kwargs)
    if not isinstance(net, BACKBONES):
        supported = ", ".join(cls.__name__ for cls in BACKBONES)
        raise ValueError(f"{family} needs a timm {supported} backbone; {name!r} is a {type(net).__name__}")
    return net


class PooledBackbone(nn.Module, metaclass=ABCMeta):
    """A timm backbone whose global average pooling a learned pooling replaces; the base of ``CAStream`` and
    ``SimPool``.

    ``backbone`` holds the timm network with its classifier; everything else is the pooling, the only part that
    trains after ``freeze_backbone()``. A subclass pools in ``pool_features(x) -> (pooled [B, d], last features
    [B, d, h, w])`` and ``pool_intermediates``, the same with the backbone's intermediates from the same pass, and
    sets ``checkpoint_options``, the options that change its tensors (named when a checkpoint does not fit).
    """

    checkpoint_options: ClassVar[str] = "options"

    def __init__(self, backbone: nn.Module, in_chans: int = 3, drop_rate: float = 0.0, return_saliency: bool = True):
        super().__init__()
        self.backbone = backbone
        self.return_saliency = return_saliency
        self.backbone_frozen = False
        self.num_classes = backbone.num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = backbone.num_features
        self.min_input_size = backbone.feature_info[-1]["reduction"]
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in backbone.feature_info]

    @abstractmethod
    def pool_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features [B, d] that replace GAP's, and the last stage's features [B, d, h, w]."""

    @abstractmethod
    def pool_intermediates(self, x: torch.Tensor, indices: int | list[int] | None,
                           norm: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``pool_features(x)`` and the backbone's features at ``indices`` (as ``forward_intermediates``), one pass."""

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans, model_name(self), self.min_input_size)

    def _check_intermediates_input(self, x: torch.Tensor, output_fmt: str) -> None:
        if output_fmt != "NCHW":
            raise ValueError(f"{model_name(self)} gives its intermediates as NCHW only, got output_fmt={output_fmt!r}")
        self._check_input(x)

    @staticmethod
    def _tokens(pooled: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled.unsqueeze(1), features.flatten(2).transpose(1, 2)], dim=1)

    # --- timm model interface -----------------------------------------------------------------

    def _classify(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # The backbone's head pools a 1x1 map to the pooled vector itself, then applies its norm (ConvNeXt) and
        # classifier.
        return self.backbone.forward_head(pooled[:, :, None, None], pre_logits=pre_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, 1 + h*w, d]: the pooled features as a class token, then the last stage's patch tokens.

        As for timm's ViTs, ``forward_head`` reads the class token.
        """
        return self._tokens(*self.pool_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classify the class token of ``forward_features`` output (pre-classifier features if asked)."""
        if x.ndim != 3:
            raise ValueError(f"forward_head expects the tokens [B, 1 + h*w, d] of forward_features, got shape "
                             f"{tuple(x.shape)}")
        return self._classify(x[:, 0], pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the backbone's features at its ``feature_info`` points, as its own
        ``forward_intermediates`` gives them (``indices``: the last n if an int, all if None; ``norm``: the backbone's
        pre-head norm on the last, for a ConvNeXt). Unless ``intermediates_only``, ``forward_features``' tokens come
        first, from the same pass; ``stop_early`` then does not apply, the pooling needing the last stage.
        """
        self._check_intermediates_input(x, output_fmt)
        if intermediates_only:
            return self.backbone.forward_intermediates(x, indices, norm, stop_early, intermediates_only=True)
        pooled, features, intermediates = self.pool_intermediates(x, indices, norm)
        return self._tokens(pooled, features), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's feature API: keep the backbone up to the last of ``indices`` (its own pruning) and return their
        absolute indices. The pooling goes with the classifier (``prune_head``, or the last stage pruned): what is
        left is a feature extractor, for ``forward_intermediates(..., intermediates_only=True)``."""
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm, prune_head)
        self.num_classes = self.backbone.num_classes
        self.num_features, self.head_hidden_size = self.backbone.num_features, self.backbone.head_hidden_size
        if prune_head or max(take_indices) < len(self.feature_info) - 1:
            for name in [name for name, _ in self.named_children() if name != "backbone"]:
                delattr(self, name)
        return take_indices

    def group_matcher(self, coarse: bool = False) -> dict[str, list]:
        """The backbone's parameter groups (timm's layer-wise lr decay); the pooling joins its last stage's group."""
        matcher = {}
        for group, spec in self.backbone.group_matcher(coarse).items():
            patterns = [(spec, None)] if isinstance(spec, str) else spec
            matcher[group] = [(rf"^backbone\.(?:{pattern.removeprefix('^').replace('|^', '|')})", suffix)
                              for pattern, suffix in patterns]
        matcher["blocks"].append((r"^(?!backbone\.)", MATCH_PREV_GROUP))
        return matcher

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 removes it); the pooling is the model's and cannot change."""
        if global_pool is not None:
            raise ValueError(f"{type(self).__name__} replaces global pooling; global_pool cannot be set")
        self.backbone.reset_classifier(num_classes)
        self.num_classes = num_classes

    # --- frozen-backbone training -------------------------------------------------------------

    def freeze_backbone(self, frozen: bool = True) -> "PooledBackbone":
        """Train the pooling only (thesis §3.3): backbone and classifier get no gradient and the
        backbone stays in eval mode (BatchNorm statistics and dropout fixed) even under ``train()``."""
        self.backbone.requires_grad_(not frozen)
        self.backbone_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "PooledBackbone":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: PooledBackbone) -> dict[str, torch.Tensor]:
    """Accept a full checkpoint of ``model``'s family or a backbone-only timm one, and name any mismatch.

    A backbone-only checkpoint (e.g. timm's ``resnet50.tv_in1k``) loads into the backbone and the
    pooling keeps its initialisation: the start of frozen-backbone training. The classifier and first
    convolution may differ in shape, since timm adapts those itself.
    """
    expected = model.state_dict()
    own = tuple({key.split(".", 1)[0] + "." for key in expected})  # backbone. and the pooling's, e.g. stream.
    if not any(key.startswith(own) for key in state_dict):
        state_dict = {f"backbone.{key}": value for key, value in state_dict.items()}
        state_dict.update({key: value for key, value in expected.items() if not key.startswith("backbone.")})
    cfg = model.pretrained_cfg
    adaptable = {f"{cfg[name]}.{param}" for name in ("classifier", "first_conv") if cfg.get(name)
                 for param in ("weight", "bias")}
    problems = checkpoint_mismatch({key: value.shape for key, value in state_dict.items()},
                                   {key: value.shape for key, value in expected.items()}, adaptable)
    if problems:
        raise ValueError(f"checkpoint does not fit {cfg.get('architecture', 'this model')}: {problems}. "
                         f"Was it saved from another backbone or with other {model.checkpoint_options}?")
    for key in expected.keys() - state_dict.keys():  # BatchNorm counters that older checkpoints lack
        state_dict[key] = expected[key]
    return state_dict


def create_pooled_model(model_cls: type[PooledBackbone], variant: str, pretrained: bool = False,
                        **kwargs) -> PooledBackbone:
    """A registered variant of a pooling family, through ``build_zoo_model`` with ``checkpoint_filter_fn``;
    ``features_only=True`` wraps it in timm's ``FeatureGetterNet``: the backbone's features at ``out_indices``
    (default: all its feature points)."""
    return build_zoo_model(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           feature_cfg=dict(feature_cls="getter", out_indices=None), **kwargs)


def backbone_cfg(name: str, backbone_weights: str, **kwargs) -> dict:
    """The pretrained config of ``name``: the pooling is trained with its backbone weights' data config, and the
    classifier sits in the backbone. ``kwargs`` (paper_name, notes, ...) are added."""
    source = get_pretrained_cfg(backbone_weights).to_dict()
    data = {key: source[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                                         "pool_size", "license") if source.get(key) is not None}
    return dict(hf_hub_id=hub_id(name), num_classes=1000, first_conv=f"backbone.{source['first_conv']}",
                classifier=f"backbone.{source['classifier']}", **data, **kwargs)
