"""Metric inputs that take the model to compute (ROAD's imputed images, the randomised models' maps, the grids'
maps): each is declared once, with its function, by the module of the metrics that need it; the harness's
``measure`` computes those its metrics need. The inputs every harness run computes itself (``p``, ``o``,
``maps_of_masked``, ``curves``) are declared in ``zoo.metrics.INPUTS``."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from zoo.metrics import INPUTS

__all__ = ["COMPUTED_INPUTS", "ComputedInput", "Explanations", "computed_input", "explains_again"]


@dataclass(frozen=True)
class Explanations:
    """What an input's function may read: the model, one row per explanation (the image, its map, the explained
    class), how the maps were made (``method`` and its ``options``; None for a ground-truth baseline), how the
    class's probability is read, the autocast dtype of repeated forwards (None: float32), and ``shared``: the
    inputs computed before it (``p``, ``labels``, ``predictions``, ...)."""

    model: nn.Module
    images: torch.Tensor  # [N, C, H, W]
    maps: torch.Tensor  # [N, H, W] in [0, 1]
    classes: torch.Tensor  # [N]
    method: str | None = None
    options: dict = field(default_factory=dict)
    probabilities: str = "softmax"
    amp_dtype: str | None = None
    shared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ComputedInput:
    compute: Callable[[Explanations], object]
    explains: bool  # it runs the saliency method again (on other images or another model): a box baseline cannot


COMPUTED_INPUTS: dict[str, ComputedInput] = {}


def computed_input(name: str, description: str, explains: bool = False):
    """Declare input ``name`` (added to ``zoo.metrics.INPUTS`` with ``description``) computed by the decorated
    ``fn(explanations: Explanations)``; ``explains``: it runs the method again."""
    if name in INPUTS:
        raise ValueError(f"a metric input {name!r} is declared already ({INPUTS[name]})")

    def register(fn: Callable[[Explanations], object]):
        INPUTS[name] = description
        COMPUTED_INPUTS[name] = ComputedInput(fn, explains)
        return fn
    return register


def explains_again(needs: tuple[str, ...]) -> bool:
    """Whether a metric needing these inputs runs the saliency method again (which a ground-truth box cannot)."""
    return "maps_of_masked" in needs or any(COMPUTED_INPUTS[name].explains for name in needs
                                            if name in COMPUTED_INPUTS)
