"""interpretable-zoo: timm image classifiers that explain themselves.

``import zoo`` registers the zoo's architectures with timm, so ``timm.create_model`` builds them.
"""

import timm

from . import export as export  # zoo.export: torch.export and ONNX graphs with the saliency as an output
from .models import (
    CamClassifier,
    CAStream,
    CrossAttentionBlock,
    CrossAttentionStream,
    MobileNetV2Cifar,
    PooledBackbone,
    PoolOutput,
    ResNetCifar,
    SimPool,
    StreamOutput,
    simpool_attention,
)
from .output import ModelOutput

__all__ = ["CAStream", "CamClassifier", "CrossAttentionBlock", "CrossAttentionStream", "MobileNetV2Cifar",
           "ModelOutput", "PoolOutput", "PooledBackbone", "ResNetCifar", "SimPool", "StreamOutput", "list_models",
           "simpool_attention"]

_MODULES = ("castream", "cifar", "simpool")


def list_models(pattern: str = "", pretrained: bool = False) -> list[str]:
    """Names of the zoo's architectures (``arch.tag`` names with ``pretrained=True``), as timm lists them."""
    return timm.list_models(pattern or "*", module=list(_MODULES), pretrained=pretrained)
