"""Faithfulness metrics: how the target probability reacts to masking the image by its saliency map.

``p`` holds the target-class probabilities on the images and ``o`` those on the images masked by
their saliency maps (see ``evaluation.saliency.mask_images``); both are [N] tensors.
"""

import torch

__all__ = ["average_drop", "average_gain", "average_increase"]


def average_drop(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AD = 100/N sum_i [p_i - o_i]_+ / p_i, lower is better (eq. 1.10)."""
    return 100 * ((p - o).clamp(min=0) / p).mean()


def average_gain(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AG = 100/N sum_i [o_i - p_i]_+ / (1 - p_i), higher is better (eq. 2.8)."""
    return 100 * ((o - p).clamp(min=0) / (1 - p)).mean()


def average_increase(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """AI = 100/N sum_i 1[p_i < o_i], higher is better (eq. 1.11)."""
    return 100 * (p < o).float().mean()
