"""ResNet-18 and MobileNet-V2 in their CIFAR forms, with the class activation map as built-in saliency.

Thesis ch. 4 (Torres Figueroa 2024; "A Learning Paradigm for Interpretable Gradients", VISAPP 2024) trains
these two networks on CIFAR-100 (32x32 images) with and without gradient denoising (thesis §4.3). Their CIFAR
form keeps the resolution in the stem: a 3x3 stride-1 first convolution and no max-pool for ResNet-18, and
for MobileNet-V2 the ImageNet network without its first two downsamplings. Both end at stride 8 (4x4 maps
at 32 px), then global average pooling (GAP) and a linear classifier.

Because the head is GAP then linear, the predicted logit splits exactly over positions: with features
``f_i`` at the ``h*w`` positions and classifier row ``w_c``, ``y_c = mean_i (w_c . f_i) + b_c``. The map
``w_c . f_i`` of the predicted class is CAM (Zhou et al. 2016, thesis §1.3.2); ``forward`` returns it with
the logits, computed from the same features.
"""

from collections import OrderedDict

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..hub import hub_id
from ..output import ModelOutput, check_image_batch, model_name
from ._builder import build_zoo_model

__all__ = ["BasicBlock", "CamClassifier", "ConvBnAct", "InvertedResidual", "MobileNetV2Cifar", "ResNetCifar"]


class ConvBnAct(nn.Sequential):
    """Convolution without bias, BatchNorm, then an activation module (none for a linear bottleneck)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act_layer: type[nn.Module] | None = nn.ReLU):
        super().__init__(OrderedDict([
            ("conv", nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)),
            ("bn", nn.BatchNorm2d(out_chs)),
            ("act", act_layer() if act_layer is not None else nn.Identity()),
        ]))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers around a ReLU, added to the input (or to its 1x1 conv-BN projection when the
    stride or width changes), then a ReLU (He et al. 2016)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, 3, stride)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3, act_layer=None)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ConvBnAct(in_chs, out_chs, 1, stride, act_layer=None)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNet-V2 block (Sandler et al. 2018): 1x1 expansion by ``expand_ratio`` (none when it is 1),
    3x3 depthwise convolution, each with BN and ReLU6, then a linear 1x1 projection with BN; the input is
    added when the stride is 1 and the width is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_chs * expand_ratio
        self.conv_pw = ConvBnAct(in_chs, hidden, 1, act_layer=nn.ReLU6) if expand_ratio != 1 else nn.Identity()
        self.conv_dw = ConvBnAct(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.ReLU6)
        self.conv_pwl = ConvBnAct(hidden, out_chs, 1, act_layer=None)
        self.has_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return x + out if self.has_residual else out


class CamClassifier(nn.Module):
    """Stem, ``stages``, then GAP, dropout and a linear classifier; ``forward`` adds the predicted class's CAM.

    ``forward(x)`` returns ``ModelOutput(logits, saliency)`` with saliency ``[B, h, w]`` the map
    ``w_c . f_i`` of the predicted class ``c`` over the last stage's features ``f`` (in logit units: in eval
    mode its mean plus the classifier bias ``b_c`` is the logit ``y_c``; in training mode the dropout before
    the classifier breaks that equality, the map being computed without it). With ``return_saliency=False``,
    or without a classifier (``num_classes=0``), forward returns the plain output of ``forward_head``.

    Subclasses set ``stem``, ``stages`` (an ``nn.Sequential`` of stages), ``feature_info`` and
    ``num_features`` and then call ``_init_head``. The last stage outputs the features the head pools, so it
    is also the layer post-hoc CAM methods explain by default.
    """

    stem: nn.Module
    stages: nn.Sequential
    feature_info: list[dict]
    num_features: int

    def _init_head(self, num_classes: int, in_chans: int, drop_rate: float, return_saliency: bool) -> None:
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.return_saliency = return_saliency
        self.grad_checkpointing = False
        self.head_hidden_size = self.num_features
        self.min_input_size = self.feature_info[-1]["reduction"]
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- timm model interface -----------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's features ``[B, num_features, h, w]`` (stride 8: 4x4 at 32 px)."""
        check_image_batch(x, self.in_chans, model_name(self), self.min_input_size)
        x = self.stem(x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if recompute else stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """GAP and dropout of ``forward_features`` output, then the classifier (unless ``pre_logits``)."""
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> ModelOutput | torch.Tensor:
        """Logits and the predicted class's CAM from one pass (plain logits with ``return_saliency=False``)."""
        features = self.forward_features(x)
        logits = self.forward_head(features)
        if not self.return_saliency or self.num_classes == 0:
            return logits
        return ModelOutput(logits, self.class_activation_map(features, logits.argmax(-1)))

    def class_activation_map(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` map ``w_c . f_i`` of class ``target[b]`` over ``forward_features`` output; its mean
        plus the classifier bias is that class's logit (eval mode)."""
        if self.num_classes == 0:
            raise ValueError("a class activation map needs the classifier; this model has num_classes=0")
        return torch.einsum("bchw,bc->bhw", features, self.fc.weight[target])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 removes it); the pooling stays GAP, which CAM needs."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"the class activation map needs global average pooling; global_pool={global_pool!r} "
                             "is not available")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class ResNetCifar(CamClassifier):
    """ResNet of BasicBlocks in the CIFAR form: 3x3 stride-1 stem, no max-pool, stages at strides 1, 2, 2, 2.

    With ``layers=(2, 2, 2, 2)`` this is the CIFAR ResNet-18 of thesis ch. 4 (11.22M parameters with 100
    classes). Feature maps: 64, 128, 256, 512 channels at reductions 1, 2, 4, 8.

    Args:
        layers: blocks per stage.
        widths: channels per stage (the stem has the first stage's width).
        num_classes: classifier outputs (0: none, forward returns pooled features).
        in_chans: image channels.
        drop_rate: dropout before the classifier.
        return_saliency: forward returns ``ModelOutput`` (default) or plain logits.
    """

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0, return_saliency: bool = True):
        super().__init__()
        self.stem = ConvBnAct(in_chans, widths[0], 3)
        stages, in_chs, reduction = [], widths[0], 1
        self.feature_info = []
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self._init_head(num_classes, in_chans, drop_rate, return_saliency)


# (expansion t, output channels c, repeats n, first stride s) of ImageNet MobileNet-V2 with the strides of
# its first two downsamplings (the stem's and the 24-channel group's) set to 1.
_MOBILENETV2_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))


class MobileNetV2Cifar(CamClassifier):
    """MobileNet-V2 in the CIFAR form: 3x3 stride-1 stem (32 channels, ReLU6), the seven inverted-residual
    groups with total stride 8, a 1x1 convolution to 1280 channels with BN and ReLU6, GAP, dropout, linear.

    Groups are gathered by resolution into four stages (reductions 1, 2, 4, 8: 24, 32, 96 and 1280 channels);
    the last stage ends with the 1x1 head convolution, so it outputs the features the classifier pools.
    2.35M parameters with 100 classes, as torchvision's ``mobilenet_v2(num_classes=100)`` (the strides change
    no weight).

    Args:
        block_args: ``(t, c, n, s)`` per inverted-residual group.
        stem_chs: stem width.
        num_features: width of the 1x1 head convolution.
        num_classes: classifier outputs (0: none, forward returns pooled features).
        in_chans: image channels.
        drop_rate: dropout before the classifier.
        return_saliency: forward returns ``ModelOutput`` (default) or plain logits.
    """

    def __init__(self, block_args: tuple[tuple[int, int, int, int], ...] = _MOBILENETV2_CIFAR, stem_chs: int = 32,
                 num_features: int = 1280, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0,
                 return_saliency: bool = True):
        super().__init__()
        self.stem = ConvBnAct(in_chans, stem_chs, 3, act_layer=nn.ReLU6)
        stages, blocks, in_chs, reduction = [], [], stem_chs, 1
        self.feature_info = []
        for group, (t, c, n, s) in enumerate(block_args):
            if s != 1 and blocks:  # a downsampling group starts a stage
                stages.append(nn.Sequential(*blocks))
                self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{len(stages) - 1}"))
                blocks = []
            reduction *= s
            for j in range(n):
                blocks.append(InvertedResidual(in_chs, c, s if j == 0 else 1, t))
                in_chs = c
            if group == len(block_args) - 1:
                blocks.append(ConvBnAct(in_chs, num_features, 1, act_layer=nn.ReLU6))
        stages.append(nn.Sequential(*blocks))
        self.feature_info.append(dict(num_chs=num_features, reduction=reduction, module=f"stages.{len(stages) - 1}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = num_features
        self._init_head(num_classes, in_chans, drop_rate, return_saliency)


def _create_cifar(model_cls: type[CamClassifier], variant: str, pretrained: bool = False, **kwargs) -> CamClassifier:
    feature_cfg = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))
    return build_zoo_model(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _cfg(name: str, notes: str, **kwargs) -> dict:
    """CIFAR-100 weights trained by the zoo (thesis §4.3.1 protocol), read at their native 32x32."""
    return dict(
        hf_hub_id=hub_id(name), num_classes=100, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
        interpolation="bilinear", mean=_CIFAR100_MEAN, std=_CIFAR100_STD, first_conv="stem.conv", classifier="fc",
        license="apache-2.0", paper_name="A Learning Paradigm for Interpretable Gradients", notes=(notes,),
        **kwargs,
    )


_BASELINE = ("baseline: cross-entropy only; CIFAR-100, 200 epochs, SGD lr 0.1 / 5 at epochs 60, 120, 160, "
             "batch 128 (thesis §4.3.1)")
_DENOISED = ("gradient-denoised: cross-entropy + {lam} x cosine distance between the input gradient and its "
             "guided-backprop counterpart (thesis ch. 4, {table}); training otherwise as the baseline")

default_cfgs = generate_default_cfgs({
    "resnet18_cifar.c100": _cfg("resnet18_cifar.c100", _BASELINE),
    "resnet18_cifar.c100_gd": _cfg("resnet18_cifar.c100_gd", _DENOISED.format(
        lam="7.5e-3", table="Tables 4.1-4.3")),
    "mobilenetv2_cifar.c100": _cfg("mobilenetv2_cifar.c100", _BASELINE),
    "mobilenetv2_cifar.c100_gd": _cfg("mobilenetv2_cifar.c100_gd", _DENOISED.format(
        lam="1e-3", table="Table 4.1, which lists lambda = 1e-3 for MobileNet-V2")),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """CIFAR ResNet-18 with built-in CAM (thesis ch. 4, Table 4.1)."""
    model_args = dict(layers=(2, 2, 2, 2))
    return _create_cifar(ResNetCifar, "resnet18_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs) -> MobileNetV2Cifar:
    """CIFAR MobileNet-V2 with built-in CAM (thesis ch. 4, Table 4.1)."""
    model_args = dict(block_args=_MOBILENETV2_CIFAR)
    return _create_cifar(MobileNetV2Cifar, "mobilenetv2_cifar", pretrained, **dict(model_args, **kwargs))
