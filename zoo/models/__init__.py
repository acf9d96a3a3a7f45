"""Zoo model families; importing this module registers them with timm."""

from ._pooled import PooledBackbone
from .castream import CAStream, CrossAttentionBlock, CrossAttentionStream, StreamOutput
from .cifar import CamClassifier, MobileNetV2Cifar, ResNetCifar
from .simpool import PoolOutput, SimPool, simpool_attention

__all__ = ["CAStream", "CamClassifier", "CrossAttentionBlock", "CrossAttentionStream", "MobileNetV2Cifar",
           "PoolOutput", "PooledBackbone", "ResNetCifar", "SimPool", "StreamOutput", "simpool_attention"]
