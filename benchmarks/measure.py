"""What the benchmarks share: timing that waits for the GPU, the device's name, runs written beside earlier ones."""

import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from zoo.evaluation.figures import save

__all__ = ["device_name", "save_run", "timed"]


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
