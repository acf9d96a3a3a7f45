"""Real images that are available offline: a photograph shipped with matplotlib."""

import torch
from matplotlib import cbook
from PIL import Image
from timm.data import resolve_data_config
from torchvision.transforms import v2

__all__ = ["photo", "photo_crops"]


def photo() -> Image.Image:
    """Grace Hopper's portrait (512x600 RGB), part of matplotlib's sample data."""
    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def photo_crops(model: torch.nn.Module, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random crops and flips of ``photo()``, ``size`` px square, normalised for ``model``."""
    config = resolve_data_config(model=model)
    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(config["mean"], config["std"])])
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return torch.stack([transform(photo()) for _ in range(count)])
