"""Zoo model families; importing this module registers them with timm."""

from .castream import CAStream, CrossAttentionBlock, CrossAttentionStream, StreamOutput

__all__ = ["CAStream", "CrossAttentionBlock", "CrossAttentionStream", "StreamOutput"]
