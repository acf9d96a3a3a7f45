"""What a training step minimises: an objective maps (model, images, labels) to the loss and what to log.

Every objective is a callable ``objective(model, images, labels) -> StepOutput``; the training loop only
backpropagates ``loss``, counts accuracy from ``logits`` and logs ``terms``. ``Classification`` is the
plain one (cross-entropy for class indices, binary cross-entropy for multi-hot labels);
``zoo.training.gradient_denoising.GradientDenoising`` adds the interpretable-gradient regulariser (thesis ch. 4).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.output import logits_of

__all__ = ["Classification", "StepOutput", "classification_loss", "model_logits"]


class StepOutput(NamedTuple):
    """``loss``: the scalar to backpropagate; ``logits``: [B, K]; ``terms``: detached scalars to log."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor]


def model_logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of any classifier: a zoo model's ``ModelOutput`` or a plain timm/torchvision model's tensor.

    A class-specific CA-Stream (thesis §3.6.2) is given the labels, so it trains the query of the target class.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel and compiled models wrap the model
    class_specific = getattr(inner, "class_specific", False) and labels is not None and labels.ndim == 1
    out = model(images, labels) if class_specific else model(images)
    return logits_of(out)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices [B]; binary cross-entropy for multi-hot labels [B, K] (Pascal VOC)."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


class Classification:
    """The plain objective: ``classification_loss`` of the model's logits."""

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        logits = model_logits(model, images, labels)
        loss = classification_loss(logits, labels)
        return StepOutput(loss, logits, {"classification": loss.detach()})
