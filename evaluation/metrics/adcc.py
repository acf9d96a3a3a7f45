"""ADCC (Poppi et al. 2021; thesis eq. 1.12-1.14): the harmonic mean of a map's coherency, its simplicity
(1 - complexity) and the confidence it keeps (1 - the drop of AD).

Each term is in [0, 1], scaled as in the authors' official code: coherency is Pearson's correlation mapped to
[0, 1] by (r + 1) / 2, complexity is the map's L1 norm divided by its number of pixels (its mean absolute value),
and the drop is the image's AD term as a fraction (``relative_drop``). ADCC is reported as the mean over the images
in percent (``zoo.metrics.reported_value``).
"""

import torch

from zoo.metrics import Metric, register_metric

from ._checks import check_fractions, check_maps
from .faithfulness import relative_drop

__all__ = ["adcc", "adcc_of_maps", "coherency", "complexity"]


def _is_constant(flat: torch.Tensor) -> torch.Tensor:
    """[N] flags of maps [N, P] that are constant up to rounding (as ``normalise_per_image`` decides)."""
    span = flat.amax(1) - flat.amin(1)
    return span <= 1e-5 * flat.abs().amax(1)


def coherency(maps: torch.Tensor, maps_of_masked: torch.Tensor) -> torch.Tensor:
    """Coherency per image (eq. 1.12): the Pearson correlation r between the map of each image and the map
    of that image masked by its own map, mapped to [0, 1] as (r + 1) / 2 (Poppi et al.'s official code).

    ``maps`` and ``maps_of_masked`` are [N, H, W]; returns [N]. Pearson's r is undefined for a constant
    map; by our convention two constant maps are perfectly coherent (r = 1, coherency 1: each is an affine
    function of the other) and a constant map beside a varying one is uncorrelated (r = 0, coherency 0.5).
    "Constant" allows rounding: a span below 1e-5 of the map's largest magnitude.
    """
    check_maps(maps=maps, maps_of_masked=maps_of_masked)
    dtype = torch.promote_types(maps.dtype, torch.float32)
    a, b = maps.flatten(1).to(dtype), maps_of_masked.flatten(1).to(dtype)
    a_flat, b_flat = _is_constant(a), _is_constant(b)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = ((a * b).sum(1) / norms.clamp(min=torch.finfo(dtype).tiny)).clamp(-1, 1)
    r = torch.where(a_flat | b_flat, (a_flat & b_flat).to(dtype), r)
    return (r + 1) / 2


def complexity(maps: torch.Tensor) -> torch.Tensor:
    """Complexity per image (eq. 1.13): the L1 norm of the map divided by its number of pixels, i.e. its
    mean absolute value (Poppi et al.'s official code), in [0, 1] for maps in [0, 1]. [N, H, W] -> [N]."""
    check_maps(maps=maps)
    return maps.abs().flatten(1).mean(1)


def adcc(drop: torch.Tensor, coherency: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
    """ADCC per image (eq. 1.14) from its three terms, [N] tensors in [0, 1] (``drop``: ``relative_drop``):

        ADCC = 3 / (1 / coherency + 1 / (1 - complexity) + 1 / (1 - drop)),

    higher is better. When a term is 0 the harmonic mean is 0 (its limit), not 3 / inf.
    """
    check_fractions(drop=drop, coherency=coherency, complexity=complexity)
    terms = torch.stack([coherency, 1 - complexity, 1 - drop])
    inverse_sum = (1 / terms.clamp(min=torch.finfo(terms.dtype).tiny)).sum(0)
    return torch.where((terms > 0).all(0), 3 / inverse_sum, 0.0)


def adcc_of_maps(p: torch.Tensor, o: torch.Tensor, maps: torch.Tensor, maps_of_masked: torch.Tensor) -> torch.Tensor:
    """ADCC per image from the probabilities (p, o) and maps (of the images, of the masked images) it is made of."""
    return adcc(relative_drop(p, o), coherency(maps, maps_of_masked), complexity(maps))


register_metric(Metric(key="ADCC", name="ADCC", index_type="adcc", higher_is_better=True, per_image=adcc_of_maps,
                       needs=("p", "o", "maps", "maps_of_masked"), table="faithfulness", group="adcc"))
