"""The interpretable-gradient (gradient denoising) objective, thesis ch. 4 (§4.2, eq. 4.1–4.8).

Training adds to the classification loss ``L_C`` a regulariser that pulls the standard input gradient
``δx = ∂L_C/∂x`` towards the guided-backpropagation one ``δ_G x = ∂_G L_C/∂x``, a detached "teacher":
``L = L_C + λ · mean_i E(δx_i, δ_G x_i)`` (eq. 4.3–4.4) with one of four error functions (eq. 4.5–4.8).

Conventions this implementation fixes where the thesis leaves room:

- ``δx_i`` is the gradient w.r.t. ``x_i`` of the *sum* of the per-sample losses, not of their mean ``L_C``,
  so it does not shrink with the batch size: it is sample i's own loss gradient (plus, in train mode,
  batch norm's coupling through the batch statistics, as in the thesis). ``L_C`` is the usual batch mean.
  Cosine (the default) is scale-free and unaffected; MAE, MSE and histogram intersection depend on the
  gradients' scale, hence on this choice.
- ``p`` in eq. 4.5–4.6 is the number of entries of one gradient image (C·H·W).
- A zero gradient gives error 0 and finite gradients: the norms that divide in eq. 4.7–4.8 are clamped
  from below by ``EPS`` (as ``F.normalize`` does).
- Eq. 4.8 divides by the *product* of the L1 norms, as written. With the teacher fixed, its value lies in
  ``[-1/‖δ_G x‖_1, 0]``: samples whose guided gradient is small weigh more.

One step costs five passes through the network instead of two (§4.2): the forward, the guided backward
(graph retained, not extended), the standard backward with ``create_graph=True``, then the final
backward through both the forward graph and the graph of ``δx``. The forward records its convolutions
and batch norms as ``zoo.training.double_backward`` nodes, so that last backward differentiates them cheaply,
and the two input-gradient passes compute no weight gradients.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.guided import switchable_relu

from . import double_backward
from .objectives import Classification, StepOutput, model_logits

__all__ = ["ERRORS", "EPS", "GradientDenoising", "InputGradients", "cosine_error", "histogram_intersection_error",
           "input_gradients", "mean_absolute_error", "mean_squared_error", "per_sample_classification_loss"]

EPS = 1e-12  # lower bound on the norms that divide in eq. 4.7 and 4.8


def mean_absolute_error(delta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖δ - δ'‖_1 / p`` per sample (eq. 4.5): [B, ...] x [B, ...] -> [B]."""
    return (delta - teacher).flatten(1).abs().mean(1)


def mean_squared_error(delta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖δ - δ'‖²_2 / p`` per sample (eq. 4.6)."""
    return (delta - teacher).flatten(1).square().mean(1)


def cosine_error(delta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``-<δ, δ'> / (‖δ‖_2 ‖δ'‖_2)`` per sample (eq. 4.7); 0 when either gradient is zero."""
    return -(F.normalize(delta.flatten(1), dim=1, eps=EPS) * F.normalize(teacher.flatten(1), dim=1, eps=EPS)).sum(1)


def histogram_intersection_error(delta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``-Σ_i min(|δ_i|, |δ'_i|) / (‖δ‖_1 ‖δ'‖_1)`` per sample (eq. 4.8); 0 when either gradient is zero."""
    delta, teacher = delta.flatten(1).abs(), teacher.flatten(1).abs()
    norms = delta.sum(1).clamp(min=EPS) * teacher.sum(1).clamp(min=EPS)
    return -torch.minimum(delta, teacher).sum(1) / norms


ERRORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mae": mean_absolute_error, "mse": mean_squared_error, "cosine": cosine_error,
    "histogram": histogram_intersection_error,
}


def per_sample_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's loss [B]: cross-entropy (eq. 4.2) for class indices [B], mean binary cross-entropy over
    the classes for multi-hot labels [B, K]; its mean is ``objectives.classification_loss`` (eq. 4.1)."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(1)
    return F.cross_entropy(logits, labels, reduction="none")


class InputGradients(NamedTuple):
    """``logits`` [B, K]; ``classification``: ``L_C`` (eq. 4.1); ``standard``: ``δx`` [B, C, H, W], in the
    graph (differentiable w.r.t. the parameters); ``guided``: ``δ_G x``, detached."""

    logits: torch.Tensor
    classification: torch.Tensor
    standard: torch.Tensor
    guided: torch.Tensor


def input_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    lean_double_backward: bool = True) -> InputGradients:
    """From one forward, the standard and the guided input gradients of each sample's own loss (§4.2).

    The guided backward runs first and only keeps the graph; the standard one then extends it
    (``create_graph=True``). Neither touches the parameters' ``.grad``. ``images`` are detached first.
    Under ``DistributedDataParallel`` with ``static_graph=True`` the first of these backward passes would
    trigger the gradient all-reduce before the parameters have their gradients, so that is refused.
    """
    if getattr(model, "static_graph", False):
        raise ValueError("gradient denoising needs DistributedDataParallel without static_graph: its extra "
                         "backward passes would start the gradient all-reduce too early")
    images = images.detach().requires_grad_(True)
    lean = double_backward.lean_double_backward(lean_double_backward)
    with switchable_relu() as guided_relus, lean as inputs_only:
        logits = model_logits(model, images, labels)
    per_sample = per_sample_classification_loss(logits, labels)
    summed = per_sample.sum()  # sample i's input gradient is that of its own loss
    with inputs_only.switched_on():
        with guided_relus.switched_on():
            (guided,) = torch.autograd.grad(summed, images, retain_graph=True)
        (standard,) = torch.autograd.grad(summed, images, create_graph=True)
    return InputGradients(logits, per_sample.mean(), standard, guided)


class GradientDenoising:
    """``L = L_C + λ · mean_i E(δx_i, δ_G x_i)`` (eq. 4.3–4.4), an objective as in ``zoo.training.objectives``.

    ``error``: a key of ``ERRORS`` (eq. 4.5–4.8); ``weight``: λ (thesis default: cosine, 7.5e-3). With
    weight 0 it is the plain ``Classification`` objective, without the extra passes. ``lean_double_backward``
    (default) differentiates the convolutions and batch norms through ``zoo.training.double_backward``; False keeps
    torch's own.
    """

    def __init__(self, error: str = "cosine", weight: float = 7.5e-3, lean_double_backward: bool = True):
        if error not in ERRORS:
            raise ValueError(f"unknown error function {error!r}; known: {', '.join(ERRORS)}")
        if not weight >= 0:
            raise ValueError(f"the regularisation weight must be non-negative, got {weight}")
        self.error, self.weight, self.lean_double_backward = error, weight, lean_double_backward

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        if self.weight == 0:
            return Classification()(model, images, labels)
        return self.regularised(model, images, labels)

    def regularised(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """The full objective whatever the weight, zero included (five passes); terms: L_C and L_R."""
        gradients = input_gradients(model, images, labels, self.lean_double_backward)
        regulariser = ERRORS[self.error](gradients.standard, gradients.guided).mean()  # eq. 4.3
        loss = gradients.classification + self.weight * regulariser
        terms = {"classification": gradients.classification.detach(), "regulariser": regulariser.detach()}
        return StepOutput(loss, gradients.logits, terms)

    def __repr__(self) -> str:
        return (f"GradientDenoising(error={self.error!r}, weight={self.weight}, "
                f"lean_double_backward={self.lean_double_backward})")
