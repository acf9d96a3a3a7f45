"""What the zoo's pooling families (CA-Stream, SimPool) share: a timm ResNet or ConvNeXt whose global average pooling
is replaced by a learned pooling in front of the backbone's own classifier, trained with the backbone frozen.

``PooledBackbone`` is their base class: the backbone (classifier included) under ``backbone``, the timm interface
that does not depend on how the features are pooled, and backbone freezing. ``checkpoint_filter_fn`` loads a full
checkpoint or a backbone-only timm one into any of them, ``create_pooled_model`` builds a registered variant and
``backbone_cfg`` is a variant's pretrained config: its backbone weights' data config.
"""

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import timm
import torch
from timm.models import ConvNeXt, ResNet, get_pretrained_cfg
from torch import nn

from ..hub import checkpoint_mismatch, hub_id
from ._builder import build_zoo_model

__all__ = ["BACKBONES", "PooledBackbone", "backbone_cfg", "checkpoint_filter_fn", "create_backbone",
           "create_pooled_model"]

BACKBONES = (ResNet, ConvNeXt)  # the timm families whose global average pooling a zoo pooling replaces


def create_backbone(family: str, name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, refused with a ValueError unless one of ``BACKBONES``."""
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
    [B, d, h, w])`` and sets ``checkpoint_options``, the options that change its tensors (named when a checkpoint
    does not fit).
    """

    checkpoint_options: ClassVar[str] = "options"

    def __init__(self, backbone: nn.Module, in_chans: int = 3, return_saliency: bool = True):
        super().__init__()
        self.backbone = backbone
        self.return_saliency = return_saliency
        self.backbone_frozen = False
        self.num_classes = backbone.num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = backbone.num_features
        self.min_input_size = backbone.feature_info[-1]["reduction"]
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in backbone.feature_info]

    @abstractmethod
    def pool_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features [B, d] that replace GAP's, and the last stage's features [B, d, h, w]."""

    # --- timm model interface -----------------------------------------------------------------

    def _classify(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # The backbone's head pools a 1x1 map to the pooled vector itself, then applies its norm (ConvNeXt) and
        # classifier.
        return self.backbone.forward_head(pooled[:, :, None, None], pre_logits=pre_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, 1 + h*w, d]: the pooled features as a class token, then the last stage's patch tokens.

        As for timm's ViTs, ``forward_head`` reads the class token.
        """
        pooled, features = self.pool_features(x)
        return torch.cat([pooled.unsqueeze(1), features.flatten(2).transpose(1, 2)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classify the class token of ``forward_features`` output (pre-classifier features if asked)."""
        if x.ndim != 3:
            raise ValueError(f"forward_head expects the tokens [B, 1 + h*w, d] of forward_features, got shape "
                             f"{tuple(x.shape)}")
        return self._classify(x[:, 0], pre_logits)

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
    """A registered variant of a pooling family, through ``build_zoo_model`` with ``checkpoint_filter_fn``."""
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} has no features_only form: its stage features are those of its backbone, "
                         "create the backbone with features_only=True instead")
    return build_zoo_model(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def backbone_cfg(name: str, backbone_weights: str, **kwargs) -> dict:
    """The pretrained config of ``name``: the pooling is trained with its backbone weights' data config, and the
    classifier sits in the backbone. ``kwargs`` (paper_name, notes, ...) are added."""
    source = get_pretrained_cfg(backbone_weights).to_dict()
    data = {key: source[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                                         "pool_size", "license") if source.get(key) is not None}
    return dict(hf_hub_id=hub_id(name), num_classes=1000, first_conv=f"backbone.{source['first_conv']}",
                classifier=f"backbone.{source['classifier']}", **data, **kwargs)
