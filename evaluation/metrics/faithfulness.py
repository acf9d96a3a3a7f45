"""Faithfulness: how the explained class's probability reacts to masking the image by its saliency map (thesis
§1.3.3.2, §2.4).

``p`` holds the explained class's probabilities on the images and ``o`` those on the images masked by their maps
(see ``zoo.evaluation.saliency.mask_images``), both [N] in [0, 1]: the harness reads them from the logits by a softmax
over the classes, or on a multi-label dataset by the sigmoid of the class's logit (``curves.target_probabilities``).
Each function gives its metric's per-image term, a fraction; AD, AG and AI are their means in percent
(``zoo.metrics.reported_value``).
"""

import torch

from zoo.metrics import Metric, register_metric

from ._checks import check_fractions

__all__ = ["increased", "relative_drop", "relative_gain"]


def relative_drop(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """[p - o]_+ / p per image, AD's term (thesis eq. 1.10); 0 where p = 0 (which cannot drop: 0 / 0)."""
    check_fractions(p=p, o=o)
    return torch.where(p > 0, (p - o).clamp(min=0) / p.clamp(min=torch.finfo(p.dtype).tiny), 0.0)


def relative_gain(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """[o - p]_+ / (1 - p) per image, AG's term (thesis eq. 2.8); 0 where p = 1 (no room to gain: 0 / 0)."""
    check_fractions(p=p, o=o)
    room = 1 - p
    return torch.where(room > 0, (o - p).clamp(min=0) / room.clamp(min=torch.finfo(p.dtype).tiny), 0.0)


def increased(p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """1[p < o] per image, AI's term (thesis eq. 1.11); strict: an unchanged probability does not count."""
    check_fractions(p=p, o=o)
    return (p < o).to(p.dtype)


register_metric(Metric(key="AD", name="average drop", index_type="average_drop", higher_is_better=False,
                       per_image=relative_drop, needs=("p", "o"), table="faithfulness", group="faithfulness"))
register_metric(Metric(key="AG", name="average gain", index_type="average_gain", higher_is_better=True,
                       per_image=relative_gain, needs=("p", "o"), table="faithfulness", group="faithfulness"))
register_metric(Metric(key="AI", name="average increase", index_type="average_increase", higher_is_better=True,
                       per_image=increased, needs=("p", "o"), table="faithfulness", group="faithfulness"))
