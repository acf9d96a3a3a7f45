"""Model size and cost, counted the same way for every model."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["gflops", "parameter_count"]


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those that require grad with ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def gflops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs of one forward pass on one image, counted by torch's ``FlopCounterMode``.

    Convolutions and matrix products count 2 FLOPs per multiply-accumulate; normalisation,
    activations, pooling and softmax are not counted. The model may live on the ``meta`` device,
    which counts without computing.
    """
    x = torch.empty(1, *input_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9
