"""What the benchmarks share: timing that waits for the GPU, the device's name, runs written beside earlier ones,
folders of photographs laid out as ImageNet's."""

import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib import cbook
from matplotlib.figure import Figure
from PIL import Image

from zoo.evaluation.figures import save

__all__ = ["device_name", "save_run", "timed", "write_photos"]

PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")  # matplotlib's sample data


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, waiting for the GPU's queued work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def device_name(device: torch.device) -> str:
    """The device as benchmark tables name it: the GPU's model, or the CPU with its thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def save_run(out: Path, name: str, results: dict, table: str | None = None, figure: Figure | None = None) -> Path:
    """One benchmark run written into ``out`` as ``<name>-<date-time>.json``, with ``.md`` for a Markdown
    ``table`` and ``.png`` for a ``figure`` (laid out by ``zoo.evaluation.figures.save``), beside the earlier runs
    and never over one; the stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for count in range(1, 1000):
        if not any(out.glob(f"{stem.name}.*")):
            break
        stem = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{count}"
    written = [stem.with_suffix(".json")]
    written[0].write_text(json.dumps(results, indent=2))
    if table is not None:
        written.append(stem.with_suffix(".md"))
        written[-1].write_text(table + "\n")
    if figure is not None:
        written.append(save(figure, stem.with_suffix(".png"), dpi=110))
    print("wrote " + ", ".join(str(path) for path in written))
    return stem


def write_photos(root: Path, split: str, count: int, size: tuple[int, int], classes: int = 1000,
                 seed: int = 0) -> None:
    """An ImageNet-style split ``root/<split>/c0000 ..``: ``count`` JPEGs (quality 90, ``size`` = width, height),
    image i in class ``i % classes``, each a random crop (random scale and aspect ratio) of one of matplotlib's
    photographs, flipped at random. Left as it is where ``root`` already holds the same."""
    marker = root / f"photos-{split}.json"
    recipe = dict(count=count, size=list(size), classes=classes, seed=seed, photos=list(PHOTOS))
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return
    photos = [Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[rng.integers(len(photos))]
        area = photo.width * photo.height * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        width = min(photo.width, round((area * aspect) ** 0.5))
        height = min(photo.height, round((area / aspect) ** 0.5))
        left, top = rng.integers(photo.width - width + 1), rng.integers(photo.height - height + 1)
        crop = photo.crop((left, top, left + width, top + height)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / split / f"c{index % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{index // classes}.jpg", quality=90)
    marker.write_text(json.dumps(recipe))
