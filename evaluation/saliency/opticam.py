"""Opti-CAM (thesis ch. 2, eq. 2.4-2.7): per image, the convex combination of the target layer's
feature maps whose mask keeps the target logit highest, found by gradient ascent.

Faithful to the authors' demo (features captured once, ReLU'd and detached; uniform initial weights;
bilinear upsampling and per-image normalisation of the mask; masking in pixel space; Adam; the optimised
mask is returned), and faster: the whole batch is optimised at once, each image stops on its own when its
loss no longer changes, and no gradient is computed for the model's parameters. ``stop="batch_sum"`` stops as the
authors' demo does instead: the whole batch, on its summed loss.
"""

import torch
import torch.nn.functional as F

from .core import Explainer, Number, OneOf, mask_images, min_max, pixel_statistics, saliency_method

OBJECTIVES = ("mask", "diff")
NORMALISATIONS = ("range", "max", "sigmoid")
STOPS = ("per_image", "batch_sum")
EPS = 1e-8
# iterations between the loop's checks of which images still run: every one on a CPU, where a check costs nothing;
# on a GPU a check waits for the device, so stopped images run (without moving) until the next
COMPACT_EVERY = {"cpu": 1, "default": 10}


def combine(logits_u: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``S(x; u) = sum_k softmax(u)_k A^k`` (eq. 2.4): [B, K] and [B, K, h, w] -> [B, h, w]."""
    return torch.einsum("bk,bkhw->bhw", logits_u.softmax(1), features)


def mask_of(saliency: torch.Tensor, size: tuple[int, int], normalisation: str) -> torch.Tensor:
    """``n(up(S))`` (eq. 2.6 with n of eq. 2.9-2.11): the differentiable mask in [0, 1] at the image size,
    [B, H, W]. ``range`` gives zeros for a map constant up to rounding (``min_max``)."""
    up = F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if normalisation == "sigmoid":
        return up.sigmoid()
    if normalisation == "max":
        return up / (up.amax((1, 2), keepdim=True) + EPS)
    return min_max(up, EPS)


@saliency_method("opticam", final=True, iterations=Number(0, integer=True), lr=Number(0, strict=True),
                 tolerance=Number(0), objective=OneOf(OBJECTIVES), normalisation=OneOf(NORMALISATIONS),
                 stop=OneOf(STOPS))
def opticam(ex: Explainer, iterations: int = 100, lr: float = 0.1, objective: str = "mask",
            normalisation: str = "range", tolerance: float | None = None, stop: str = "per_image", mean=None,
            std=None, amp_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Opti-CAM's optimised mask ``n(up(S(x; u*)))`` (eq. 2.6-2.7) at the image size, after at most
    ``iterations`` steps of Adam with step size ``lr`` (0 steps: the uniform starting point). ``objective``:
    ``mask`` maximises the target logit of the masked image (eq. 2.6), ``diff`` minimises its distance to
    the logit of the image (eq. 2.12). ``normalisation`` n: ``range`` (min-max, eq. 2.9), ``max`` (eq. 2.10)
    or ``sigmoid`` (eq. 2.11). ``stop="per_image"``: an image stops when its loss changes by less than
    ``tolerance`` (default 1e-10; 0: never). ``stop="batch_sum"``, the authors' demo's rule: every
    ``iterations // 10`` iterations (at least 1) the summed loss of the batch is compared with the previous
    check's, and where it fell by less than ``tolerance`` (0: where it rose) the whole batch stops with the
    weights that gave it. ``mean``/``std``: the model's input normalisation (default: its data config).
    ``amp_dtype`` runs the iterations' passes through the model under autocast (features, weights and
    masks stay in the model's dtype); its rounded logits repeat between iterations long before
    convergence, so there the default tolerance is 0.
    """
    amp = ex.autocast(amp_dtype)
    if tolerance is None:
        tolerance = 1e-10 if amp_dtype is None else 0.0
    capture = ex.capture()
    features = capture.activations.relu()
    original = ex.score(capture.logits)
    mean, std = pixel_statistics(ex.model, ex.images, mean, std)
    size = ex.images.shape[-2:]

    weights = torch.zeros(features.shape[:2], dtype=features.dtype, device=features.device, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    active = torch.ones(len(features), dtype=torch.bool, device=features.device)
    previous = torch.full_like(original, float("inf"))
    per_image = stop == "per_image"
    rows = torch.arange(len(features), device=features.device)
    every = COMPACT_EVERY.get(features.device.type, COMPACT_EVERY["default"])
    check_every, previous_sum = max(iterations // 10, 1), float("inf")  # batch_sum's checks
    for iteration in range(iterations):
        if per_image and iteration % every == 0:  # per_image's only host synchronisations
            if not active.any():
                break
            rows = active.nonzero().squeeze(1)  # between these, stopped rows still run but never move
        mask = mask_of(combine(weights[rows], features[rows]), size, normalisation)
        with amp:
            score = ex.score(ex.logits(mask_images(ex.images[rows], mask, mean, std)), rows)
        loss = -score if objective == "mask" else (original[rows] - score).abs()
        total = loss.sum()
        if not per_image and iteration % check_every == 0:  # batch_sum's host synchronisations
            if previous_sum - total.item() < tolerance:
                break
            previous_sum = total.item()
        optimizer.zero_grad()
        total.backward()
        before = weights.detach().clone()
        optimizer.step()
        with torch.no_grad():  # Adam's momentum would still move the images that have stopped
            weights.copy_(torch.where(active[:, None], weights, before))
            if per_image:
                loss = loss.detach()
                active[rows] &= (previous[rows] - loss).abs() >= tolerance
                previous[rows] = loss
    return mask_of(combine(weights.detach(), features), size, normalisation)
