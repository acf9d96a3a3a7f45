"""The grid pointing game (Böhle et al., CVPR 2021 "Convolutional Dynamic Alignment Networks", CVPR 2022 "B-cos
Networks: Alignment is All We Need for Interpretability", and B-cos v2, TPAMI 2024).

**Grids.** n x n images of n^2 distinct classes, each one the model classifies correctly and confidently, tiled at
full resolution (an n H x n W image, as B-cos' default; not downscaled to the model's input size). Cell k lies in
row k // n, column k % n (raster order), box (W (k % n), H (k // n), W (k % n + 1), H (k // n + 1)) in XYXY
pixels, x1 and y1 exclusive. ``grid_layout`` picks and places the rows; ``tile`` builds the images.

**Score.** Each cell's class is explained on the whole grid; the per-row value is the share of the map's
attribution inside the row's cell: sum of the map over the cell / sum over the grid. The maps of
``zoo.evaluation.saliency.explain`` lie in [0, 1], positive attribution only, as B-cos clamps its attributions at 0;
an all-zero map scores 0 (as the energy pointing game, and as the authors' code), a uniform one 1 / n^2. A row in no
grid is not measured: NaN, which the harness leaves out. Higher is better.

**Selection** (``grid_layout``). A row takes part when the model predicts its explained class, that class is its
label, and the class's probability p exceeds ``min_confidence`` (default ``MIN_CONFIDENCE`` = 0.5, B-cos'
threshold, strict as theirs). The rows are shuffled, grouped by class in a random class order, at most G of each
class kept, with G the most grids of n^2 distinct classes they allow (the largest G with sum over classes of
min(count, G) >= G n^2); the i-th kept row goes to grid i mod G (a class's rows are consecutive, so they land in
distinct grids), then each grid's cells are shuffled. Every draw comes from the generator given.

**In the harness** (``zoo-eval --metrics grid``, not computed by default) the grids are built within each batch
from its explained rows, ``GRID_SIZE`` = 2 (2x2) by default; the generator is seeded from the batch's explained
classes (SHA-256 of n and the class ids in row order, ``grid_seed``), so a batch gets the same grids in every
process, resumed run and method. ``grid_dataset`` builds grids over a whole dataset instead, as the authors do.
"""

import hashlib
import math
from typing import NamedTuple

import torch
from torch import nn

from zoo.evaluation.saliency import explain
from zoo.evaluation.saliency.core import evaluating
from zoo.metrics import Metric, check_class_ids, register_metric
from zoo.output import logits_of

from ._checks import check_finite, check_unit_interval
from .curves import target_probabilities
from .inputs import Explanations, computed_input

__all__ = ["GRID_SIZE", "MIN_CONFIDENCE", "GridDataset", "GridExplanations", "grid_dataset", "grid_layout",
           "grid_pointing_game", "grid_seed", "tile"]

GRID_SIZE = 2  # the harness' grids: 2x2, as B-cos v2's ImageNet evaluation
MIN_CONFIDENCE = 0.5  # B-cos' confidence threshold: the explained class's probability must exceed it


class GridExplanations(NamedTuple):
    """The harness' input ``grid``: ``maps`` [G, n^2, n H, n W], maps[g, k] the map of the class of cell k on grid
    g; ``layout`` [G, n^2], the row in each cell (``grid_layout``); ``rows``, the number of rows N."""

    maps: torch.Tensor
    layout: torch.Tensor
    rows: int


class GridDataset(NamedTuple):
    """Grids over a dataset (``grid_dataset``): ``images`` [G, C, n H, n W], and each cell's ``classes`` and
    dataset ``indices`` [G, n^2], cells in raster order."""

    images: torch.Tensor
    classes: torch.Tensor
    indices: torch.Tensor


def _check_size(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n (cells per side of a grid) must be an integer >= 2, got {n!r}")
    return n


def _check_confidence(min_confidence) -> None:
    if not isinstance(min_confidence, int | float) or isinstance(min_confidence, bool) or not 0 <= min_confidence < 1:
        raise ValueError(f"min_confidence must be a probability in [0, 1), got {min_confidence!r}")


def grid_seed(classes: torch.Tensor, n: int) -> int:
    """A seed for the grids of a batch: the first 8 bytes of the SHA-256 of n and the class ids in row order."""
    digest = hashlib.sha256(f"{n}:{classes.tolist()}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def grid_layout(classes: torch.Tensor, p: torch.Tensor, predictions: torch.Tensor,
                labels: torch.Tensor | None = None, n: int = GRID_SIZE, min_confidence: float = MIN_CONFIDENCE,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Row indices [G, n^2] (on ``classes``' device): each grid's rows, cells in raster order, one row (image) at
    most once. Rows of ``classes`` [N] (the explained classes) predicted as their class (``predictions`` [N]; and,
    where ``labels`` [N] are given, labelled so) with ``p`` [N] > ``min_confidence``; as many grids of distinct
    classes as they allow, chosen and placed by ``generator`` (a CPU generator; default torch's) as the module
    docstring says. G may be 0."""
    m = _check_size(n) ** 2
    (count,) = check_finite("[N] of probabilities", 1, p=p)
    check_unit_interval(p=p)
    for name, ids in (("classes", classes), ("predictions", predictions), ("labels", labels)):
        if ids is not None:
            check_class_ids(name, ids, count)
    _check_confidence(min_confidence)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    device, classes, predictions = classes.device, classes.cpu(), predictions.cpu()
    eligible = (predictions == classes) & (p.cpu() > min_confidence)
    if labels is not None:
        eligible &= predictions == labels.cpu()
    rows = eligible.nonzero().squeeze(1)
    rows = rows[torch.randperm(len(rows), generator=generator)]
    _, kind, counts = classes[rows].unique(return_inverse=True, return_counts=True)
    rank = torch.randperm(len(counts), generator=generator)[kind]  # a random order of the classes
    order = rank.argsort(stable=True)
    rows, rank = rows[order], rank[order]  # grouped by class, in random order within each
    grids = torch.arange(len(rows) // m + 1)
    grids = int(grids[counts.minimum(grids[:, None]).sum(1) >= grids * m].max())
    first = torch.zeros(len(counts), dtype=torch.long).scatter_reduce(0, rank, torch.arange(len(rank)), "amin",
                                                                      include_self=False)  # each class's first row
    kept = rows[torch.arange(len(rows)) - first[rank] < grids][:grids * m]  # at most G of a class
    layout = kept.view(m, grids).T  # the i-th kept row in grid i mod G
    cells = torch.rand(grids, m, generator=generator).argsort(1)
    return layout.gather(1, cells).to(device)


def _check_layout(layout: torch.Tensor, m: int, rows: int) -> None:
    if not isinstance(layout, torch.Tensor) or layout.is_floating_point() or layout.ndim != 2 \
            or layout.shape[1] != m:
        got = f"a {layout.dtype} tensor {list(layout.shape)}" if isinstance(layout, torch.Tensor) \
            else type(layout).__name__
        raise ValueError(f"layout must be an integer tensor [G, {m}] of row indices (grid_layout), got {got}")
    if layout.numel() and (layout.min() < 0 or layout.max() >= rows):
        raise ValueError(f"layout must hold row indices in [0, {rows})")


def tile(images: torch.Tensor, layout: torch.Tensor, n: int = GRID_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids [G, C, n H, n W] of ``images`` [N, C, H, W] as ``layout`` [G, n^2] places them (cell k: row
    k // n, column k % n; an image may appear in several grids), each cell at full resolution, and the cells'
    boxes [n^2, 4] (XYXY pixels, x1 and y1 exclusive), the same in every grid."""
    m = _check_size(n) ** 2
    count, channels, height, width = check_finite("[N, C, H, W]", 4, images=images)
    _check_layout(layout, m, count)
    grids = images[layout.to(images.device)].view(len(layout), n, n, channels, height, width)
    grids = grids.permute(0, 3, 1, 4, 2, 5).reshape(len(layout), channels, n * height, n * width)
    cell = torch.arange(m, device=images.device)
    row, column = cell // n, cell % n
    boxes = torch.stack([column * width, row * height, (column + 1) * width, (row + 1) * height], 1)
    return grids, boxes.to(images.dtype)


def grid_pointing_game(maps: torch.Tensor, layout: torch.Tensor, rows: int) -> torch.Tensor:
    """GPG per row [``rows``]: for the row in cell k of grid g, the share of maps[g, k] ([G, n^2, n H, n W], in
    [0, 1]) inside cell k: sum over the cell / sum over the grid, 0 for an all-zero map; NaN for a row in no grid
    (``layout`` [G, n^2], ``grid_layout``)."""
    if not isinstance(maps, torch.Tensor) or not maps.is_floating_point() or maps.ndim != 4:
        got = f"a {maps.dtype} tensor {list(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a float tensor [G, n^2, n H, n W], got {got}")
    grids, m, height, width = maps.shape
    n = math.isqrt(m)
    if n < 2 or n * n != m or height % n or width % n:
        raise ValueError(f"maps [G, n^2, n H, n W] must have a square number n^2 >= 4 of maps per grid, each "
                         f"divisible into n x n cells; got {list(maps.shape)}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be a positive number of rows, got {rows!r}")
    _check_layout(layout, m, rows)
    if layout.flatten().unique().numel() != layout.numel():
        raise ValueError("layout places a row in more than one cell: it would have two values")
    if len(layout) != grids:
        raise ValueError(f"layout has {len(layout)} grids, maps {grids}")
    values = torch.full((rows,), torch.nan, dtype=maps.dtype, device=maps.device)
    if grids:
        check_finite("[G, n^2, n H, n W]", 4, maps=maps)
        check_unit_interval(maps=maps)
        cells = maps.view(grids, m, n, height // n, n, width // n).sum((3, 5)).flatten(2)  # [G, map, cell]
        inside, total = cells.diagonal(dim1=1, dim2=2), cells.sum(2)
        share = torch.where(total > 0, inside / total.clamp(min=torch.finfo(maps.dtype).tiny), 0)
        values[layout.flatten().to(maps.device)] = share.flatten()
    return values


@computed_input("grid", "the grid pointing game's grids of the batch's confident rows, each cell's class explained "
                        "on its grid by the same method (GridExplanations)", explains=True)
def explained_grids(explained: Explanations) -> GridExplanations:
    """The batch's ``GRID_SIZE`` grids (``grid_layout``, seeded by ``grid_seed``), each cell's class explained on
    its grid with the method and options of the batch's maps, as many grid images per call as make the batch's
    pixel count."""
    if explained.method is None:
        raise ValueError("the grid pointing game explains the grids: it needs a saliency method, not a ground truth")
    shared, n = explained.shared, GRID_SIZE
    missing = [name for name in ("p", "predictions") if name not in shared]
    if missing:
        raise ValueError(f"the grid pointing game picks confidently classified rows: it needs {', '.join(missing)}")
    generator = torch.Generator().manual_seed(grid_seed(explained.classes, n))
    layout = grid_layout(explained.classes, shared["p"], shared["predictions"], shared.get("labels"), n,
                         generator=generator)
    grids, _ = tile(explained.images, layout, n)
    grid_of = torch.arange(len(layout), device=grids.device).repeat_interleave(n * n)
    targets = explained.classes[layout.flatten()]
    step = max(1, len(explained.images) // (n * n))
    maps = [explain(explained.model, grids[grid_of[start:start + step]], explained.method,
                    targets[start:start + step], **explained.options) for start in range(0, len(targets), step)]
    maps = torch.cat(maps) if maps else grids.new_zeros(0, *grids.shape[-2:])
    return GridExplanations(maps.view(len(layout), n * n, *grids.shape[-2:]), layout, len(explained.images))


def grid_dataset(model: nn.Module, dataset, n: int = GRID_SIZE, count: int | None = None,
                 min_confidence: float = MIN_CONFIDENCE, seed: int = 0, batch_size: int = 32,
                 probabilities: str = "softmax") -> GridDataset:
    """Grids over a single-label ``dataset`` (a ``zoo.data`` reader whose ``transforms`` give the model's input
    tensors, e.g. ``zoo.data.transforms.eval_transform``): its images the model classifies correctly with the
    label's probability (``probabilities``: "softmax" or "sigmoid") above ``min_confidence``, laid out by
    ``grid_layout`` with a generator seeded with ``seed``; the first ``count`` grids (default: all). The model
    reads the dataset ``batch_size`` images at a time, in eval mode, on its device."""
    _check_size(n)
    _check_confidence(min_confidence)
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive number of grids or None, got {count!r}")
    device = next(model.parameters()).device
    p, predictions, labels = [], [], []
    with evaluating(model), torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            if not all(isinstance(image, torch.Tensor) for image, _ in samples):
                raise ValueError("dataset must give image tensors: set its transforms (eval_transform)")
            batch = torch.tensor([torch.as_tensor(target["label"]).tolist() for _, target in samples])
            if batch.ndim != 1:
                raise ValueError("grid_dataset needs a single-label dataset (one class id per image)")
            logits = logits_of(model(torch.stack([image.as_subclass(torch.Tensor) for image, _ in samples]).to(
                device)))
            labels.append(batch)
            predictions.append(logits.argmax(1).cpu())
            p.append(target_probabilities(logits, batch.to(device), probabilities).cpu())
    labels = torch.cat(labels)
    generator = torch.Generator().manual_seed(seed)
    layout = grid_layout(labels, torch.cat(p), torch.cat(predictions), labels, n, min_confidence, generator)[:count]
    if not len(layout):
        raise ValueError(f"no grid: the images classified correctly with p > {min_confidence} span fewer than "
                         f"{n * n} classes")
    images = torch.stack([dataset[i][0].as_subclass(torch.Tensor) for i in layout.flatten().tolist()])
    grids, _ = tile(images, torch.arange(len(images)).view_as(layout), n)
    return GridDataset(grids, labels[layout], layout)


register_metric(Metric(key="GPG", name="grid pointing game", index_type="grid_pointing_game", higher_is_better=True,
                       per_image=lambda grid: grid_pointing_game(*grid), needs=("grid",), table="localisation",
                       group="grid", only_for="single-label", by_default=False))
