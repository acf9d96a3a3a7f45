"""Input-space maps: the gradient of the target logit with respect to the image, plain or guided."""

import torch

from zoo.guided import guided_relu

from .core import Explainer, saliency_method


def input_gradient(ex: Explainer, guided: bool = False) -> torch.Tensor:
    """d(target logit)/d(image), [B, C, H, W]; with ``guided`` by guided backpropagation."""
    images = ex.images.clone().requires_grad_(True)
    if guided:
        with guided_relu():
            logits = ex.logits(images)
    else:
        logits = ex.logits(images)
    ex.resolve_targets(logits)
    return torch.autograd.grad(ex.score(logits).sum(), images)[0]


@saliency_method("gradient")
def gradient(ex: Explainer) -> torch.Tensor:
    """Gradient saliency (Simonyan et al. 2014): largest absolute input gradient over channels."""
    return input_gradient(ex).abs().amax(1)


@saliency_method("guided_backprop")
def guided_backprop(ex: Explainer) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2014), reduced over channels as ``gradient``."""
    return input_gradient(ex, guided=True).abs().amax(1)
