"""Zoo model families; importing this module registers them with timm."""

from .castream import CAStream, CrossAttentionBlock, CrossAttentionStream, StreamOutput
from .cifar import CamClassifier, MobileNetV2Cifar, ResNetCifar

__all__ = ["CAStream", "CamClassifier", "CrossAttentionBlock", "CrossAttentionStream", "MobileNetV2Cifar",
           "ResNetCifar", "StreamOutput"]
