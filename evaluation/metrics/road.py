"""ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML) and ARCC.

**Removal.** For each percentage k of ``ROAD_PERCENTAGES`` (10, 20, ..., 90, pytorch-grad-cam's ``ROADCombined``
default; 0 would remove nothing and 100 leave nothing to impute from) ``floor(k * H * W / 100)`` pixels of the image
are removed: MoRF (most relevant first) the first of the map's order, LeRF (least relevant first) the last.
The order is descending saliency, ties in raster order (the lower ``h * W + w`` first), as insertion and deletion
take pixels; LeRF removes the tail of that same order. Every removal is imputed (below) and the model gives the
explained class's probability on the result (``curves.target_probabilities``: softmax, or sigmoid on a multi-label
model), as ``road_probabilities`` [N, 2, K] (MoRF, LeRF).

**Metrics**, per image, from those and the probability p on the image, in percentage points (probability
differences times 100, ``zoo.metrics.reported_value``): ROAD-MoRF = mean_k (MoRF_k - p), lower is better; ROAD-LeRF
= mean_k (LeRF_k - p), higher is better; ROAD = (ROAD-LeRF - ROAD-MoRF) / 2, in [-1/2, 1/2], higher is better
(pytorch-grad-cam's ``ROADCombined``). ARCC is ADCC (Poppi et al. 2021, ``adcc.adcc``) with ``clip(2 * ROAD, 0, 1)``
in place of 1 - drop: 3 / (1 / coherency + 1 / (1 - complexity) + 1 / clip(2 * ROAD, 0, 1)), as pytorch-grad-cam's
``ARCC``, over the same percentages as the ROAD column (pytorch-grad-cam's ARCC defaults to 20, 40, 60, 80).

**Noisy linear imputation** (Rong et al.). Each removed pixel is the weighted mean of its 8 neighbours inside
the image, weight 1/6 for the 4 direct ones and 1/12 for the diagonal ones, divided by the weights present (fewer at
the border); kept pixels stay fixed. Multiplying each equation by its weight sum d_i gives the symmetric positive
definite system D x - W x = b over the removed pixels (W: the weights between removed neighbours, b: the weighted
sum of the kept neighbours), solved by conjugate gradients for every image and channel at once, on their device,
until each system's residual is at most ``tolerance`` (1e-6) times its right-hand side's (L2 norms), within
``max_iterations`` (default 10 (H + W), a RuntimeError beyond; the count grows with the largest hole: at 224 px
measured 626 for MoRF 90 % of a Grad-CAM map, 768 with a single corner pixel kept). Gaussian noise of standard deviation
``noise`` is then added to the removed pixels. ROAD imputes in pixel space (the model's normalisation undone, as
``mask_images`` masks), where the authors' code imputes, with their sigma 0.01; the imputation itself is the same
in either space (each equation is a weighted mean), only the noise's scale differs.
"""

import math
from typing import NamedTuple

import torch
from torch import nn

from zoo.evaluation.saliency.core import autocast, evaluating, forward_batch, pixel_statistics
from zoo.metrics import Metric, register_metric
from zoo.output import logits_of

from ._checks import check_finite, check_fractions, check_unit_interval
from .adcc import adcc, coherency, complexity
from .curves import _check_inputs, target_probabilities
from .inputs import Explanations, computed_input

__all__ = ["ROAD_NOISE", "ROAD_PERCENTAGES", "ROAD_TOLERANCE", "RoadProbabilities", "arcc", "arcc_of_maps",
           "noisy_linear_imputation", "removal_masks", "road_combined", "road_lerf", "road_morf",
           "road_probabilities"]

ROAD_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01  # the standard deviation of the authors' code, in pixel space ([0, 1])
ROAD_TOLERANCE = 1e-6  # of the conjugate gradients' residual, relative to the right-hand side's


class RoadProbabilities(NamedTuple):
    """The explained class's probability after removing ``percentages[j]`` % of the pixels and imputing them:
    ``probabilities`` [N, 2, K], [:, 0] MoRF and [:, 1] LeRF."""

    probabilities: torch.Tensor
    percentages: tuple[int, ...]


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each pixel's neighbours inside the image, 1/6 direct and 1/12 diagonal, of [..., H, W]:
    the 3x3 convolution (zero padding) with ([1 2 1]^T [1 2 1] - 4 at the centre) / 12, done separably."""
    rows = x.clone()
    rows[..., 1:, :] += x[..., :-1, :]
    rows[..., :-1, :] += x[..., 1:, :]
    rows += x
    block = rows.clone()
    block[..., 1:] += rows[..., :-1]
    block[..., :-1] += rows[..., 1:]
    block += rows
    return (block - 4 * x) / 12


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-system inner products [N, C] of [N, C, H, W] tensors."""
    return torch.einsum("nchw,nchw->nc", a, b)


def _solve(images: torch.Tensor, removed: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """Conjugate gradients on D x - W x = b (module docstring) for every image and channel; the removed pixels'
    solution, 0 elsewhere."""
    inside = _neighbour_sum(torch.ones_like(images[:1, :1]))  # D: each pixel's weights inside the image
    mask = removed[:, None].to(images.dtype)
    b = mask * _neighbour_sum((1 - mask) * images)
    x, r, p = torch.zeros_like(images), b.clone(), b.clone()
    rr = _dot(r, r)
    limit = tolerance**2 * rr
    tiny = torch.finfo(images.dtype).tiny
    for _ in range(max_iterations):
        active = rr > limit
        if not active.any():
            return x
        ap = mask * (inside * p - _neighbour_sum(p))  # p is 0 outside the removed pixels
        alpha = torch.where(active, rr / _dot(p, ap).clamp(min=tiny), 0)[..., None, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rr_next = _dot(r, r)
        beta = torch.where(active, rr_next / rr.clamp(min=tiny), 0)[..., None, None]
        p.mul_(beta).add_(r)
        rr = rr_next
    if (rr > limit).any():
        worst = (rr / limit.clamp(min=tiny)).max().sqrt().item() * tolerance
        raise RuntimeError(f"noisy linear imputation did not converge in {max_iterations} iterations (relative "
                           f"residual {worst:.2g} > tolerance {tolerance:g}): raise max_iterations")
    return x


def noisy_linear_imputation(images: torch.Tensor, removed: torch.Tensor, noise: float = ROAD_NOISE,
                            generator: torch.Generator | None = None, tolerance: float = ROAD_TOLERANCE,
                            max_iterations: int | None = None) -> torch.Tensor:
    """Rong et al.'s noisy linear imputation (module docstring) of ``images`` [N, C, H, W] where ``removed``
    [N, H, W] (bool) is True: each removed pixel the weighted mean of its neighbours, plus Gaussian noise of standard
    deviation ``noise`` drawn from ``generator`` (default: torch's) image by image ([C, H, W] each, in turn, so that
    imputing a batch in parts, in order, with one generator draws what imputing it at once does). Solved in at least
    float32 to ``tolerance`` within ``max_iterations`` (default 10 (H + W)); returned in the images' dtype."""
    shape = check_finite("[N, C, H, W]", 4, images=images)
    if not isinstance(removed, torch.Tensor) or removed.dtype != torch.bool or removed.shape != (shape[0],
                                                                                               *shape[2:]):
        got = f"a {removed.dtype} tensor {list(removed.shape)}" if isinstance(removed, torch.Tensor) \
            else type(removed).__name__
        raise ValueError(f"removed must be a bool tensor {[shape[0], *shape[2:]]} (one mask per image), got {got}")
    everything = removed.flatten(1).all(1)
    if everything.any():
        raise ValueError(f"removed takes every pixel of images {everything.nonzero().flatten().tolist()}: there is "
                         "nothing to impute from (the system is singular)")
    if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
    if not (isinstance(tolerance, int | float) and tolerance > 0):
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    max_iterations = 10 * (shape[2] + shape[3]) if max_iterations is None else max_iterations
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer or None, got {max_iterations!r}")
    dtype = torch.promote_types(images.dtype, torch.float32)
    removed = removed.to(images.device)
    imputed = _solve(images.detach().to(dtype), removed, tolerance, max_iterations)
    if noise > 0:
        imputed += noise * torch.stack([torch.randn(shape[1:], generator=generator, dtype=dtype, device=images.device)
                                        for _ in range(shape[0])])
    return torch.where(removed[:, None], imputed.to(images.dtype), images)


def _check_percentages(percentages) -> tuple[int, ...]:
    percentages = tuple(percentages) if isinstance(percentages, list | tuple) else percentages
    if not (isinstance(percentages, tuple) and percentages
            and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 99 for k in percentages)):
        raise ValueError(f"percentages must be a non-empty sequence of integers in [1, 99], got {percentages!r}")
    return percentages


def removal_masks(maps: torch.Tensor, percentages=ROAD_PERCENTAGES) -> torch.Tensor:
    """The pixels ROAD removes, [N, 2, K, H, W] bool: [:, 0, j] MoRF, the first ``floor(k_j * H * W / 100)`` of
    each map's order (descending saliency, ties in raster order), [:, 1, j] LeRF, as many from its end."""
    count, height, width = check_finite("of maps [N, H, W]", 3, maps=maps)
    percentages = _check_percentages(percentages)
    pixels = height * width
    order = maps.detach().flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=order.device).expand_as(order))
    removed = torch.tensor([k * pixels // 100 for k in percentages], device=maps.device)[:, None]
    morf = rank[:, None] < removed
    lerf = rank[:, None] >= pixels - removed
    return torch.stack([morf, lerf], 1).view(count, 2, len(percentages), height, width)


def road_probabilities(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                       percentages=ROAD_PERCENTAGES, noise: float = ROAD_NOISE, seed: int = 0,
                       batch_size: int | None = None, probabilities: str = "softmax",
                       amp_dtype: torch.dtype | str | None = None) -> RoadProbabilities:
    """The ``targets`` class's probability [N, 2, K] on ``images`` (the model's normalised input [N, C, H, W]) with
    the pixels of ``removal_masks(maps, percentages)`` imputed by ``noisy_linear_imputation`` in pixel space (the
    model's data config's mean and std undone), the noise from a generator on the images' device seeded with
    ``seed`` at each call. The 2 K imputed images of every image are imputed and sent through the model
    ``batch_size`` at a time (default: 8 on a CPU, on a GPU as many as its free memory holds,
    ``zoo.evaluation.saliency.core.forward_batch``), one percentage and order after the other so that a batch's
    holes are alike, in eval mode under ``torch.no_grad``, under autocast to ``amp_dtype`` if given (the imputation
    and the probabilities stay float32); the noise does not depend on ``batch_size``."""
    targets = _check_inputs(images, maps, targets, batch_size, probabilities)
    if targets is None:
        raise ValueError("targets must be given: one class per image")
    percentages = _check_percentages(percentages)
    count, k = len(images), len(percentages)
    with evaluating(model), torch.no_grad():
        images = images.detach()
        masks = removal_masks(maps.to(images.device), percentages).transpose(0, 2).flatten(0, 2)  # (k, order, image)
        image_of = torch.arange(count, device=images.device).repeat(2 * k)
        mean, std = pixel_statistics(model, images)
        pixels = images * std + mean
        generator = torch.Generator(device=images.device).manual_seed(seed)
        batch_size = batch_size or forward_batch(model, images[0], amp_dtype, cpu=8)
        found = []
        for start in range(0, len(masks), batch_size):
            rows, removed = image_of[start:start + batch_size], masks[start:start + batch_size]
            imputed = noisy_linear_imputation(pixels[rows], removed, noise, generator)
            imputed = torch.where(removed[:, None], (imputed - mean) / std, images[rows])  # the rest exactly as given
            with autocast(images.device, amp_dtype):
                logits = logits_of(model(imputed))
            if targets.min() < 0 or targets.max() >= logits.shape[1]:
                raise ValueError(f"targets must be class indices in [0, {logits.shape[1]}), got values in "
                                 f"[{targets.min().item()}, {targets.max().item()}]")
            found.append(target_probabilities(logits, targets[rows], probabilities))
    return RoadProbabilities(torch.cat(found).view(k, 2, count).permute(2, 1, 0), percentages)


@computed_input("road", "ROAD: the explained class's probability after MoRF and LeRF removal of each preset "
                        "percentage of the pixels and noisy linear imputation (RoadProbabilities)")
def explained_road(explained: Explanations) -> RoadProbabilities:
    """``road_probabilities`` of the harness' explanations with the preset percentages, noise and seed 0."""
    return road_probabilities(explained.model, explained.images, explained.maps, explained.classes,
                              probabilities=explained.probabilities, amp_dtype=explained.amp_dtype)


def _changes(p: torch.Tensor, road: RoadProbabilities) -> torch.Tensor:
    """[N, 2]: the mean over the percentages of the probability after removal minus p, MoRF and LeRF."""
    check_finite("[N] of values in [0, 1]", 1, p=p)
    check_unit_interval(p=p)
    if not isinstance(road, RoadProbabilities):
        raise ValueError(f"road must be RoadProbabilities (road_probabilities), got {type(road).__name__}")
    found = road.probabilities
    expected = [len(p), 2, len(road.percentages)]
    if not isinstance(found, torch.Tensor) or list(found.shape) != expected:
        got = list(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ValueError(f"road probabilities must be a tensor {expected} (images, MoRF/LeRF, percentages) for "
                         f"{len(p)} values of p, got {got}")
    check_fractions(road_probabilities=found)
    return found.to(p.dtype).mean(2) - p[:, None]


def road_morf(p: torch.Tensor, road: RoadProbabilities) -> torch.Tensor:
    """ROAD-MoRF per image [N]: the mean over the percentages of the probability after removing the most salient
    pixels, minus p (Rong et al. 2022, MoRF curve); in [-1, 1], lower is better."""
    return _changes(p, road)[:, 0]


def road_lerf(p: torch.Tensor, road: RoadProbabilities) -> torch.Tensor:
    """ROAD-LeRF per image [N]: the same after removing the least salient pixels; higher is better."""
    return _changes(p, road)[:, 1]


def road_combined(p: torch.Tensor, road: RoadProbabilities) -> torch.Tensor:
    """ROAD per image [N]: (ROAD-LeRF - ROAD-MoRF) / 2, pytorch-grad-cam's ``ROADCombined``; in [-1/2, 1/2],
    higher is better."""
    changes = _changes(p, road)
    return (changes[:, 1] - changes[:, 0]) / 2


def arcc(road: torch.Tensor, coherency: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
    """ARCC per image [N] from its terms, [N] tensors (``road``: ``road_combined``; the others in [0, 1]):
    ``adcc.adcc`` with 1 - clip(2 ROAD, 0, 1) as the drop, i.e. 3 / (1 / coherency + 1 / (1 - complexity) +
    1 / clip(2 ROAD, 0, 1)) (pytorch-grad-cam's ``ARCC``); 0 where a term is 0; higher is better."""
    check_finite("[N]", 1, road=road, coherency=coherency, complexity=complexity)
    return adcc(1 - (2 * road).clamp(0, 1), coherency, complexity)


def arcc_of_maps(p: torch.Tensor, road: RoadProbabilities, maps: torch.Tensor,
                 maps_of_masked: torch.Tensor) -> torch.Tensor:
    """ARCC per image from p, the ROAD probabilities and the maps (of the images, of the masked images)."""
    return arcc(road_combined(p, road), coherency(maps, maps_of_masked), complexity(maps))


register_metric(Metric(key="ROAD-MoRF", name="ROAD, most relevant first", index_type="road_morf",
                       higher_is_better=False, per_image=road_morf, needs=("p", "road"), table="faithfulness",
                       group="road", by_default=False))
register_metric(Metric(key="ROAD-LeRF", name="ROAD, least relevant first", index_type="road_lerf",
                       higher_is_better=True, per_image=road_lerf, needs=("p", "road"), table="faithfulness",
                       group="road", by_default=False))
register_metric(Metric(key="ROAD", name="ROAD, (LeRF - MoRF) / 2", index_type="road", higher_is_better=True,
                       per_image=road_combined, needs=("p", "road"), table="faithfulness", group="road",
                       by_default=False))
register_metric(Metric(key="ARCC", name="ARCC", index_type="arcc", higher_is_better=True, per_image=arcc_of_maps,
                       needs=("p", "road", "maps", "maps_of_masked"), table="faithfulness", group="road",
                       by_default=False))
