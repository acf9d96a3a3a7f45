"""Faithfulness metrics: how the target probability reacts to masking the image by its saliency map.

``p`` holds the target-class probabilities on the images and ``o`` those on the images masked by
their saliency maps (see ``zoo.evaluation.saliency.mask_images``); both are [N] tensors in [0, 1].
AD, AG and AI are percentages over the N images (thesis §1.3.3.2, §2.4).

ADCC (Poppi et al. 2021, thesis eq. 1.12-1.14) is computed per image from three terms in [0, 1], scaled
as in the authors' official code: ``coherency`` is the Pearson correlation mapped to [0, 1] by (r + 1) / 2,
``complexity`` is the L1 norm of the map divided by its number of pixels (its mean absolute value) and
the drop is the image's AD term as a fraction (``relative_drop``). The ADCC of a set of images is the mean
of ``adcc`` over them, times 100 for the percentage the papers report.
"""

import torch

__all__ = ["adcc", "average_drop", "average_gain", "average_increase", "coherency", "complexity", "relative_drop"]


def _check_fractions(**named: torch.Tensor) -> None:
    """ValueError naming the problem unless all tensors share one non-empty shape, are finite and lie in [0, 1]."""
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float tensor, got {got}")
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    for name, t in named.items():
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: there is nothing to average")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or Inf at {int((~torch.isfinite(t)).sum())} of {t.numel()} entries")
        if t.min() < 0 or t.max() > 1:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{t.min().item():.4g}, {t.max().item():.4g}]")


def relative_drop(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Per-image drop [p_i - o_i]_+ / p_i as a fraction, the term AD averages (eq. 1.10).

    An image with p_i = 0 cannot drop and contributes 0 (the ratio would be 0 / 0).
    """
    _check_fractions(p=p, o=o)
    return torch.where(p > 0, (p - o).clamp(min=0) / p.clamp(min=torch.finfo(p.dtype).tiny), 0.0)


def average_drop(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AD = 100/N sum_i [p_i - o_i]_+ / p_i, lower is better (eq. 1.10); p_i = 0 contributes 0."""
    return 100 * relative_drop(p, o).mean()


def average_gain(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AG = 100/N sum_i [o_i - p_i]_+ / (1 - p_i), higher is better (eq. 2.8).

    An image with p_i = 1 has no room to gain (o_i <= 1 = p_i) and contributes 0 instead of 0 / 0.
    """
    _check_fractions(p=p, o=o)
    room = 1 - p
    gain = torch.where(room > 0, (o - p).clamp(min=0) / room.clamp(min=torch.finfo(p.dtype).tiny), 0.0)
    return 100 * gain.mean()


def average_increase(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AI = 100/N sum_i 1[p_i < o_i], higher is better (eq. 1.11); strict, equal probabilities do not count."""
    _check_fractions(p=p, o=o)
    return 100 * (p < o).float().mean()


def _check_maps(**named: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in named.items()}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point() or t.shape[1:].numel() == 0:
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float tensor of maps [N, H, W], got {got}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or Inf at {int((~torch.isfinite(t)).sum())} of {t.numel()} entries")
    if len(set(shapes.values())) > 1:
        raise ValueError("map shapes differ: " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


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
    _check_maps(maps=maps, maps_of_masked=maps_of_masked)
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
    _check_maps(maps=maps)
    return maps.abs().flatten(1).mean(1)


def adcc(drop: torch.Tensor, coherency: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
    """ADCC per image (eq. 1.14): the harmonic mean of coherency, 1 - complexity and 1 - drop,

        ADCC = 3 / (1 / coherency + 1 / (1 - complexity) + 1 / (1 - drop)),

    from three [N] tensors in [0, 1] (``drop`` is ``relative_drop``, a fraction). Higher is better. When a
    term is 0 the harmonic mean is 0 (its limit), not 3 / inf; average over images and multiply by 100 for
    the percentage Poppi et al. report.
    """
    _check_fractions(drop=drop, coherency=coherency, complexity=complexity)
    terms = torch.stack([coherency, 1 - complexity, 1 - drop])
    inverse_sum = (1 / terms.clamp(min=torch.finfo(terms.dtype).tiny)).sum(0)
    return torch.where((terms > 0).all(0), 3 / inverse_sum, 0.0)
