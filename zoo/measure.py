"""Model size and cost, measured the same way for every model."""

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["device_name", "gflops", "parameter_count", "save_run", "timed"]


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those that require grad with ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def gflops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs of one forward pass on one image, counted by torch's ``FlopCounterMode``.

    Convolutions and matrix products count 2 FLOPs per multiply-accumulate; normalisation,
    activations, pooling and softmax are not counted. The model may live on the ``meta`` device,
    which counts without computing.
    """
    x = torch.empty(1, *input_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


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


def save_run(out: Path, name: str, results: dict, table: str | None = None, figure=None) -> Path:
    """One benchmark run written into ``out`` as ``<name>-<date-time>.json``, with ``.md`` for a Markdown
    ``table`` and ``.png`` for a matplotlib ``figure``, beside the earlier runs and never over one; the stem."""
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
        written.append(stem.with_suffix(".png"))
        figure.savefig(written[-1], dpi=110)
    print("wrote " + ", ".join(str(path) for path in written))
    return stem
