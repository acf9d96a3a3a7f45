"""Insertion and deletion (Petsiuk et al. 2018, "RISE"; thesis §1.3.3.3, Algorithms 1-2).

Pixels are taken in descending order of saliency, a fixed number per step. Insertion starts from a blurred
copy of the image and puts the original pixels back; deletion starts from the image and replaces its pixels
by a constant. At each of the ``steps + 1`` points (0, 1, ..., ``steps`` steps done) the model gives the
probability of the target class (``target_probabilities``: the softmax over the classes by default, or the sigmoid
of the class's own logit for a multi-label model); the score is the area under that curve by the trapezoid rule
with the x axis normalised to [0, 1] (higher is better for insertion, lower for deletion): a fraction per image, I
and D its mean in percent (``zoo.metrics.reported_value``).

Protocols (``PROTOCOLS``; a ``PerturbationProtocol`` of your own works too):

- ``"released"`` (the default): 28 steps; insertion into a blur with a 5x5 Gaussian kernel, sigma 5; deletion
  to 0 in the normalised tensor (the dataset mean colour). At 224x224 it is what the authors' released
  evaluation runs: 224 * 8 = 1792 pixels per step, 29 evaluations per curve. It matches them only at 224 px:
  their code takes imsize / 8 steps of 8 * imsize pixels, where this preset keeps 28 steps at every size (see
  Conventions); at 96x96 this preset perturbs ceil(9216 / 28) = 330 pixels per step (the last step 306) in 29
  evaluations per curve, theirs 96 / 8 = 12 steps of 768 pixels in 13. It is the default because at 224 px it is
  what the authors' code runs (the thesis' text states the 224-step protocol; which of the two produced its
  tables cannot be checked) and it costs 8x fewer forward passes.
- ``"thesis"``: the protocol as the thesis states it: 224 steps of 224 pixels at 224x224 (225 evaluations per
  curve, 449 forward passes for the two); insertion into the blur of RISE's code (11x11 kernel, sigma 5); deletion
  to 0 as above.

Conventions:

- Other image sizes keep the number of steps: ``ceil(H * W / steps)`` pixels per step, so step ``i`` has
  ``min(i * ceil(H * W / steps), H * W)`` pixels perturbed and the last point is always the fully inserted
  (the original) or fully deleted image. When ``steps`` does not divide ``H * W`` the last steps perturb
  fewer pixels or none; the x axis stays ``i / steps``. (At 224x224 both presets divide exactly.)
- Order: descending saliency; ties are broken by raster order (the lower ``h * W + w`` first): a stable sort.
- Blur: RISE's kernel (a Gaussian filter, truncated at 4 sigma and reflected at the kernel's border, applied
  to a delta the size of the kernel), convolved per channel with zero padding, on the normalised tensor.
  The released 5x5 kernel is built the same way (we assume the authors kept RISE's ``gkern``).
- Both curves share their point at the original image (deletion's first, insertion's last): it is
  evaluated once.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.evaluation.saliency.core import autocast, check_targets, evaluating, forward_batch
from zoo.metrics import Metric, register_metric
from zoo.output import logits_of

from ._checks import check_maps

# blur and gaussian_kernel are public too, but stay out of the package namespace
__all__ = ["DEFAULT_PROTOCOL", "PROBABILITIES", "PROTOCOLS", "InsertionDeletionScores", "PerturbationCurves",
           "PerturbationProtocol", "area_under_curve", "blur", "check_probabilities", "deletion_area", "insertion_area",
           "insertion_deletion", "perturbation_curves", "target_probabilities"]


@dataclass(frozen=True)
class PerturbationProtocol:
    """How insertion and deletion perturb an image.

    ``steps``: number of steps (the curves have ``steps + 1`` points); ``blur_size`` and ``blur_sigma``:
    the Gaussian blur insertion starts from; ``deletion_value``: what deleted pixels become in the
    normalised tensor (0 = the dataset mean colour).
    """

    name: str
    steps: int
    blur_size: int
    blur_sigma: float
    deletion_value: float = 0.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"protocol {self.name!r}: steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.blur_size, int) or self.blur_size < 1 or self.blur_size % 2 == 0:
            raise ValueError(f"protocol {self.name!r}: blur_size must be a positive odd integer, "
                             f"got {self.blur_size!r}")
        if not self.blur_sigma > 0:
            raise ValueError(f"protocol {self.name!r}: blur_sigma must be positive, got {self.blur_sigma!r}")

    def pixels_per_step(self, height: int, width: int) -> int:
        """``ceil(H * W / steps)``: 1792 for "released" and 224 for "thesis" at 224x224."""
        return math.ceil(height * width / self.steps)

    def counts(self, height: int, width: int) -> list[int]:
        """Number of pixels perturbed at each of the ``steps + 1`` points."""
        per_step = self.pixels_per_step(height, width)
        return [min(i * per_step, height * width) for i in range(self.steps + 1)]


PROTOCOLS = {
    "released": PerturbationProtocol("released", steps=28, blur_size=5, blur_sigma=5.0),
    "thesis": PerturbationProtocol("thesis", steps=224, blur_size=11, blur_sigma=5.0),
}
DEFAULT_PROTOCOL = "released"
PROBABILITIES = {  # how a class's probability is read from the logits [N, C], by name: see target_probabilities
    "softmax": lambda logits: logits.softmax(1),
    "sigmoid": torch.sigmoid,
}


class PerturbationCurves(NamedTuple):
    """Target-class probability after each step: ``insertion`` and ``deletion``, each [B, steps + 1]."""

    insertion: torch.Tensor
    deletion: torch.Tensor


class InsertionDeletionScores(NamedTuple):
    """Area under each curve per image, [B] in [0, 1]: insertion (higher is better), deletion (lower)."""

    insertion: torch.Tensor
    deletion: torch.Tensor


def _protocol(protocol: str | PerturbationProtocol) -> PerturbationProtocol:
    if isinstance(protocol, PerturbationProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)} (or a PerturbationProtocol)")
    return PROTOCOLS[protocol]


def gaussian_kernel(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """RISE's blur kernel [size, size]: a Gaussian filter (sampled, truncated at 4 sigma, normalised) run over
    a delta at the centre of a size x size grid whose border reflects (scipy's ``gaussian_filter`` default).
    The reflections fold the truncated tails back in, so the kernel sums to 1 even when sigma >> size."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # grid position i + j folded back into [0, size) by reflection ("d c b a | a b c d | d c b a", period
    # 2 * size); the kernel at i sums the weights of the offsets j that land on the centre
    positions = (torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None]) % (2 * size)
    reflected = torch.where(positions < size, positions, 2 * size - 1 - positions)
    line = (weights[None] * (reflected == size // 2)).sum(1)
    return torch.outer(line, line).to(dtype=dtype, device=device)


def blur(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Each channel of [B, C, H, W] convolved with ``gaussian_kernel(size, sigma)``, zero padding (as RISE)."""
    channels = images.shape[1]
    kernel = gaussian_kernel(size, sigma, images.dtype, images.device).expand(channels, 1, size, size)
    return F.conv2d(images, kernel, padding=size // 2, groups=channels)


def area_under_curve(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid rule over points at x = i / steps, i = 0..steps: (sum - first / 2 - last / 2) / steps.
    [..., steps + 1] -> [...]; a curve rising linearly from 0 to 1 scores 0.5."""
    if not isinstance(curves, torch.Tensor) or curves.ndim == 0 or curves.shape[-1] < 2:
        got = tuple(curves.shape) if isinstance(curves, torch.Tensor) else type(curves).__name__
        raise ValueError(f"curves must be a tensor [..., steps + 1] with at least 2 points, got {got}")
    steps = curves.shape[-1] - 1
    return (curves.sum(-1) - (curves[..., 0] + curves[..., -1]) / 2) / steps


def _check_inputs(images, maps, targets, batch_size, probabilities) -> torch.Tensor | None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
            else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, C, H, W], got {got}")
    if len(images) == 0:
        raise ValueError("images is an empty batch: there is nothing to perturb")
    check_maps(maps=maps)
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {images.shape[0]} images: give one map per image")
    if maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps are {tuple(maps.shape[-2:])} but images are {tuple(images.shape[-2:])}: upsample "
                         "the maps to the image size first (e.g. zoo.evaluation.saliency.core.normalise_per_image)")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    check_probabilities(probabilities)
    return check_targets(targets, len(images), images.device)


def check_probabilities(probabilities: str) -> None:
    """Refuse a name that is not one of ``PROBABILITIES``."""
    if probabilities not in PROBABILITIES:
        raise ValueError(f"probabilities must be one of {', '.join(PROBABILITIES)}, got {probabilities!r}")


def target_probabilities(logits: torch.Tensor, targets: torch.Tensor, probabilities: str = "softmax") -> torch.Tensor:
    """The probability of each row's target class, computed in at least float32: ``"softmax"`` over the classes
    (a single-label model, trained with cross-entropy) or ``"sigmoid"`` of the class's own logit (a multi-label
    model, trained with binary cross-entropy per class, as the authors' code scores Pascal VOC)."""
    check_probabilities(probabilities)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return PROBABILITIES[probabilities](logits.to(dtype)).gather(1, targets[:, None]).squeeze(1)


def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets=None,
                        protocol: str | PerturbationProtocol = DEFAULT_PROTOCOL, batch_size: int | None = None,
                        probabilities: str = "softmax",
                        amp_dtype: torch.dtype | str | None = None) -> PerturbationCurves:
    """Insertion and deletion curves [B, steps + 1] of the target class's probability.

    ``images``: the model's normalised input [B, C, H, W]; ``maps``: saliency [B, H, W] at the image size
    (any real values: only their order counts); ``targets``: one class per image (default: the class
    predicted on the image); ``probabilities``: ``"softmax"`` or, for a multi-label model, ``"sigmoid"``
    (``target_probabilities``). All (image, step) pairs are built on the images' device and sent through the
    model ``batch_size`` at a time (default: 8 on a CPU, where larger batches run slower, on a GPU as many as
    its free memory holds: ``zoo.evaluation.saliency.core.forward_batch``), under ``torch.no_grad``, in eval mode
    (the model's modes are restored), under autocast to ``amp_dtype`` if given (the probabilities are computed in
    float32 from its logits).
    """
    protocol = _protocol(protocol)
    targets = _check_inputs(images, maps, targets, batch_size, probabilities)
    count, height, width = len(images), *images.shape[-2:]
    pixels = height * width

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with autocast(inputs.device, amp_dtype):
            return logits_of(model(inputs))

    with evaluating(model), torch.no_grad():
        images = images.detach()
        batch_size = batch_size or forward_batch(model, images[0], amp_dtype, cpu=8)
        logits = torch.cat([forward(images[i:i + batch_size]) for i in range(0, count, batch_size)])
        num_classes = logits.shape[1]
        if targets is None:
            targets = logits.argmax(1)
        elif targets.min() < 0 or targets.max() >= num_classes:
            raise ValueError(f"targets must be class indices in [0, {num_classes}), got values in "
                             f"[{targets.min().item()}, {targets.max().item()}]")
        original = target_probabilities(logits, targets, probabilities)

        # rank[b, p]: the position of pixel p in image b's order (descending saliency, ties in raster order)
        order = maps.detach().to(images.device).flatten(1).argsort(dim=1, descending=True, stable=True)
        positions = torch.arange(pixels, device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        blurred = blur(images, protocol.blur_size, protocol.blur_sigma)
        counts = torch.tensor(protocol.counts(height, width), device=images.device)
        steps = protocol.steps

        # every point but the shared original: insertion steps 0..steps-1, deletion steps 1..steps
        image_of = torch.arange(count, device=images.device).repeat_interleave(2 * steps)
        step_of = torch.cat([torch.arange(steps), torch.arange(1, steps + 1)]).to(images.device).repeat(count)
        deleting = torch.arange(2 * steps, device=images.device).repeat(count) >= steps
        points = original.new_empty(len(image_of))
        for start in range(0, len(image_of), batch_size):
            rows = slice(start, start + batch_size)
            b, deletes = image_of[rows], deleting[rows]
            perturbed = (rank[b] < counts[step_of[rows]][:, None]).view(-1, 1, height, width)
            # insertion shows the image where perturbed (else the blur); deletion where not (else the value)
            keep_image = perturbed != deletes.view(-1, 1, 1, 1)
            elsewhere = torch.where(deletes.view(-1, 1, 1, 1), protocol.deletion_value, blurred[b])
            logits = forward(torch.where(keep_image, images[b], elsewhere))
            points[rows] = target_probabilities(logits, targets[b], probabilities)
    points = points.view(count, 2, steps)
    insertion = torch.cat([points[:, 0], original[:, None]], 1)
    deletion = torch.cat([original[:, None], points[:, 1]], 1)
    return PerturbationCurves(insertion, deletion)


def insertion_area(curves: PerturbationCurves) -> torch.Tensor:
    """Insertion score per image [B]: the area under its insertion curve, in [0, 1], higher is better."""
    return area_under_curve(curves.insertion)


def deletion_area(curves: PerturbationCurves) -> torch.Tensor:
    """Deletion score per image [B]: the area under its deletion curve, in [0, 1], lower is better."""
    return area_under_curve(curves.deletion)


def insertion_deletion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets=None,
                       protocol: str | PerturbationProtocol = DEFAULT_PROTOCOL, batch_size: int | None = None,
                       probabilities: str = "softmax",
                       amp_dtype: torch.dtype | str | None = None) -> InsertionDeletionScores:
    """Insertion and deletion scores per image, [B] each, from ``perturbation_curves``."""
    curves = perturbation_curves(model, images, maps, targets, protocol, batch_size, probabilities, amp_dtype)
    return InsertionDeletionScores(insertion_area(curves), deletion_area(curves))


register_metric(Metric(key="I", name="insertion AUC", index_type="insertion", higher_is_better=True,
                       per_image=insertion_area, needs=("curves",), table="faithfulness", group="curves"))
register_metric(Metric(key="D", name="deletion AUC", index_type="deletion", higher_is_better=False,
                       per_image=deletion_area, needs=("curves",), table="faithfulness", group="curves"))
