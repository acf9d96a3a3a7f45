"""Localisation metrics: how a saliency map agrees with the ground-truth boxes of its image (thesis eq. 1.16-1.22,
Table 2.6).

Conventions (all functions):

- ``maps``: [N, H, W] float tensor in [0, 1] at image resolution (as ``zoo.evaluation.saliency.explain`` gives).
- ``boxes``: the ground truth, a sequence of N tensors [n_i, 4], n_i >= 1, in pixel coordinates (x0, y0, x1, y1)
  with x1, y1 *exclusive*, as torchvision's XYXY boxes (``tv_tensors.BoundingBoxes``, ``torchvision.ops``): a box
  touching the right border has x1 = W, its area is (x1 - x0)(y1 - y0), and pixel (u, v) belongs to it when its
  centre (u + 0.5, v + 0.5) does. Boxes may be float. ``BoundingBoxes`` must be XYXY on an H x W canvas.
- Predicted box B_p: the map binarised by S > threshold (strictly; by default the map's own mean), then the
  bounding box of its largest 8-connected component (ties between equally large components: the one whose
  first pixel in raster order comes first). A map with no pixel above the threshold (all-zero or constant
  maps at their mean) gives the empty box (0, 0, 0, 0): IoU 0 with every box, area 0.
- IoU is that of the boxes as rectangles (``torchvision.ops.box_iou``), i.e. of their pixel sets for integer
  boxes such as B_p.
- Per-image values are returned, as fractions where the thesis uses percentages (OM, LE, precision / EP,
  recall, F1, BoxAcc hits, SP; RRA); the Saliency Metric is a plain number. The thesis' figures are their means (BoxAcc:
  ``max_box_accuracy``), in percent (``zoo.metrics.reported_value``).
"""

from collections.abc import Sequence

import torch
from torchvision import tv_tensors

from zoo.metrics import Metric, check_class_ids, register_metric

from ._checks import check_maps, check_unit_interval

__all__ = [
    "BOX_ACCURACY_IOUS",
    "BOX_ACCURACY_THRESHOLDS",
    "box_accuracy",
    "energy_pointing_game",
    "localisation_error",
    "max_box_accuracy",
    "official_metric",
    "pixel_f1",
    "pixel_precision",
    "pixel_recall",
    "pointing_game",
    "predicted_boxes",
    "relevance_rank_accuracy",
    "saliency_metric",
]

BOX_ACCURACY_THRESHOLDS = tuple(i / 100 for i in range(100))  # map thresholds eta of Choe et al. 2020
BOX_ACCURACY_IOUS = (0.3, 0.5, 0.7)  # IoU thresholds delta of their MaxBoxAccV2
_CHUNK = 2**24  # pixels labelled at once by box_accuracy


def _check_maps(maps: torch.Tensor) -> tuple[int, int, int]:
    shape = check_maps(maps=maps)
    check_unit_interval(maps=maps)
    return shape


def _gt_boxes(boxes: Sequence[torch.Tensor], maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the ground-truth boxes; return them padded, [N, M, 4] in the maps' dtype and device, and
    which entries are real, [N, M]."""
    n, h, w = _check_maps(maps)
    if isinstance(boxes, torch.Tensor) or len(boxes) != n:
        raise ValueError(f"boxes must be a sequence of {n} tensors [n_i, 4], one per map")
    rows = []
    for i, given in enumerate(boxes):
        if isinstance(given, tv_tensors.BoundingBoxes):
            if given.format != tv_tensors.BoundingBoxFormat.XYXY:
                raise ValueError(f"boxes[{i}] are {given.format.name} boxes; convert them to XYXY")
            if tuple(given.canvas_size) != (h, w):
                raise ValueError(f"maps are {h}x{w} but boxes[{i}] lie on a "
                                 f"{given.canvas_size[0]}x{given.canvas_size[1]} image")
            given = given.as_subclass(torch.Tensor)
        if not isinstance(given, torch.Tensor) or given.ndim != 2 or given.shape[1] != 4 or len(given) == 0:
            shape = list(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"boxes[{i}] must be a tensor [n_i >= 1, 4] of (x0, y0, x1, y1), got {shape}")
        rows.append(given.to(maps.device, maps.dtype))
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    counts = torch.tensor([len(r) for r in rows], device=maps.device)
    valid = torch.arange(padded.shape[1], device=maps.device) < counts[:, None]
    if not padded.isfinite().all():
        raise ValueError("boxes contain NaN or Inf")
    x0, y0, x1, y1 = padded[valid].unbind(-1)
    if ((x1 <= x0) | (y1 <= y0)).any():
        raise ValueError("boxes contain an empty box (x1 <= x0 or y1 <= y0); x1, y1 are exclusive")
    if ((x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h)).any():
        raise ValueError(f"boxes reach outside the {h}x{w} maps (0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h}); "
                         "are the maps at image resolution?")
    return padded, valid


def _component_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Integer box [N, 4] (exclusive x1, y1) of the largest 8-connected component of each mask [N, H, W].

    Components are found on the masks' row runs: each run is linked to the runs it touches in the rows
    above and below (looked up from either run's first pixel, which finds every touching pair), and run
    labels take the smallest label across links, with path compression, until they stop changing. Labels
    only ever move to a smaller run index of the same component, so each component ends labelled by its
    first run in raster order.
    """
    n, h, w = masks.shape
    starts, ends = masks.clone(), masks.clone()
    starts[..., 1:] &= ~masks[..., :-1]
    ends[..., :-1] &= ~masks[..., 1:]
    first = starts.flatten().nonzero().squeeze(1)  # flat index of each run's first pixel, in raster order
    last = ends.flatten().nonzero().squeeze(1)
    image, y, x0, x1 = first // (h * w), first // w % h, first % w, last % w + 1
    runs = torch.arange(len(first), device=masks.device)
    dy, dx = torch.tensor([[-1, -1, -1, 1, 1, 1], [-1, 0, 1, -1, 0, 1]], device=masks.device)[..., None]
    touching = (y + dy >= 0) & (y + dy < h) & (x0 + dx >= 0) & (x0 + dx < w)  # [6, runs]
    other = torch.where(touching, first + dy * w + dx, 0)  # the 8-neighbours above and below a first pixel
    touching &= masks.flatten()[other]
    a, b = runs.expand_as(other)[touching], torch.searchsorted(first, other[touching], right=True) - 1
    label = runs
    while True:
        low = torch.minimum(label[a], label[b])
        ref = label.scatter_reduce(0, label[a], low, "amin").scatter_reduce(0, label[b], low, "amin")
        while not torch.equal(jumped := ref[ref], ref):
            ref = jumped
        if torch.equal(ref[label], label):
            break
        label = ref[label]
    size = torch.zeros_like(runs).scatter_add_(0, label, x1 - x0)
    best = torch.zeros(n, dtype=torch.long, device=masks.device).scatter_reduce(0, image, size, "amax")
    first_best = torch.where(size == best[image], runs, len(runs))  # ties: the first component in raster order
    chosen = torch.full_like(best, len(runs)).scatter_reduce(0, image, first_best, "amin")
    inside = label == chosen[image]
    image = image[inside]
    box = torch.zeros(n, 4, dtype=torch.long, device=masks.device)  # stays (0, 0, 0, 0) for an empty mask
    for k, (value, reduce) in enumerate([(x0, "amin"), (y, "amin"), (x1, "amax"), (y + 1, "amax")]):
        box[:, k].scatter_reduce_(0, image, value[inside], reduce, include_self=False)
    return box


def predicted_boxes(maps: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """B_p [N, 4]: box of the largest 8-connected component of S > threshold (default: each map's mean;
    thesis' Notation before eq. 1.15); (0, 0, 0, 0) when no pixel exceeds it."""
    _check_maps(maps)
    if threshold is None:  # at least the minimum, so that rounding cannot put a constant map above its mean
        threshold = torch.maximum(maps.mean((1, 2), keepdim=True), maps.amin((1, 2), keepdim=True))
    return _component_boxes(maps > threshold).to(maps.dtype)


def _max_iou(boxes: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """max_{B in gt} IoU(B, box) per image: boxes [..., N, 4], gt [N, M, 4] -> [..., N]. IoU of the boxes as
    rectangles, as ``torchvision.ops.box_iou``: for integer boxes, the IoU of their pixel sets."""
    boxes = boxes.unsqueeze(-2)
    wh = (torch.minimum(boxes[..., 2:], gt[..., 2:]) - torch.maximum(boxes[..., :2], gt[..., :2])).clamp(min=0)
    inter = wh.prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1) + (gt[..., 2:] - gt[..., :2]).prod(-1)
    return torch.where(valid, inter / (area - inter).clamp(min=1e-12), 0).amax(-1)


def official_metric(maps: torch.Tensor, boxes: Sequence[torch.Tensor], predictions: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """OM = 1 - max_B IoU(B, B_p) 1[c_p = c] per image, lower is better (eq. 1.16)."""
    gt, valid = _gt_boxes(boxes, maps)
    check_class_ids("predictions", predictions, len(maps))
    check_class_ids("labels", labels, len(maps))
    correct = (predictions.to(maps.device) == labels.to(maps.device)).to(maps.dtype)
    return 1 - _max_iou(predicted_boxes(maps), gt, valid) * correct


def localisation_error(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """LE = 1 - max_B IoU(B, B_p) per image, lower is better (eq. 1.17)."""
    gt, valid = _gt_boxes(boxes, maps)
    return 1 - _max_iou(predicted_boxes(maps), gt, valid)


def _near_boxes(gt: torch.Tensor, valid: torch.Tensor, h: int, w: int, tolerance: float = 0) -> torch.Tensor:
    """[N, H, W]: pixels within ``tolerance`` pixels (Euclidean, centre to centre) of a pixel of the union U
    of the boxes; with tolerance 0, U itself (the pixels whose centre lies in a box)."""
    first = torch.ceil(gt - 0.5)  # first pixel inside, from x0 and y0
    last = first - 1  # last pixel inside, from x1 and y1
    u = torch.arange(w, device=gt.device, dtype=gt.dtype)
    v = torch.arange(h, device=gt.device, dtype=gt.dtype)
    dx = (first[..., 0, None] - u).clamp(min=0) + (u - last[..., 2, None]).clamp(min=0)  # [N, M, W]
    dy = (first[..., 1, None] - v).clamp(min=0) + (v - last[..., 3, None]).clamp(min=0)  # [N, M, H]
    near = dy[..., :, None] ** 2 + dx[..., None, :] ** 2 <= tolerance**2
    return (near & valid[..., None, None]).any(1)


def _precision_recall(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """P (eq. 1.18, 0 for an all-zero map) and R (eq. 1.19) per image."""
    gt, valid = _gt_boxes(boxes, maps)
    union = _near_boxes(gt, valid, *maps.shape[1:])
    size = union.sum((1, 2))
    if not (size > 0).all():
        raise ValueError("boxes of some image cover no pixel centre")
    inside, total = (maps * union).sum((1, 2)), maps.sum((1, 2))
    precision = torch.where(total > 0, inside / total.clamp(min=torch.finfo(maps.dtype).tiny), 0)
    return precision, inside / size


def pixel_precision(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """P = sum_{p in U} S_p / sum_p S_p per image (eq. 1.18), which is also the energy pointing game;
    0 for an all-zero map."""
    return _precision_recall(maps, boxes)[0]


energy_pointing_game = pixel_precision  # EP (Wang et al. 2020) is the precision of eq. 1.18


def pixel_recall(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = sum_{p in U} S_p / |U| per image (eq. 1.19)."""
    return _precision_recall(maps, boxes)[1]


def pixel_f1(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """F1 = 2PR / (P + R) per image (eq. 1.18-1.19); 0 when P + R = 0."""
    p, r = _precision_recall(maps, boxes)
    return torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=torch.finfo(p.dtype).tiny), 0)


def pointing_game(maps: torch.Tensor, boxes: Sequence[torch.Tensor], tolerance: float = 0) -> torch.Tensor:
    """SP = 1[p* in U] per image (eq. 1.21). Ties: a hit when any pixel of maximal saliency lies in U
    (as Quantus' PointingGame), so a constant map always hits. ``tolerance`` (pixels; Zhang et al. use 15)
    also counts pixels within that distance of U."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number of pixels, got {tolerance}")
    gt, valid = _gt_boxes(boxes, maps)
    peaks = maps == maps.amax((1, 2), keepdim=True)
    return (peaks & _near_boxes(gt, valid, *maps.shape[1:], tolerance)).flatten(1).any(1).to(maps.dtype)


def _thresholds(name: str, values: Sequence[float] | torch.Tensor, low: float, high: float, maps: torch.Tensor):
    values = torch.as_tensor(values, dtype=maps.dtype, device=maps.device)
    if values.ndim != 1 or len(values) == 0 or not ((values >= low) & (values <= high)).all():
        raise ValueError(f"{name} must be a non-empty sequence of numbers in [{low}, {high}]")
    return values


def box_accuracy(maps: torch.Tensor, boxes: Sequence[torch.Tensor],
                 thresholds: Sequence[float] | torch.Tensor = BOX_ACCURACY_THRESHOLDS,
                 ious: Sequence[float] | torch.Tensor = BOX_ACCURACY_IOUS) -> torch.Tensor:
    """BoxAcc(eta, delta) hits, max_B 1[IoU(B_p^eta, B) >= delta] (eq. 1.20), as [N, T, D] for the T map
    thresholds eta (box from S > eta) and the D IoU thresholds delta; see ``max_box_accuracy``."""
    gt, valid = _gt_boxes(boxes, maps)
    n, h, w = maps.shape
    etas = _thresholds("thresholds", thresholds, 0, 1, maps)
    deltas = _thresholds("ious", ious, 0, 1, maps)
    step = max(1, _CHUNK // max(1, n * h * w))
    predicted = torch.cat([_component_boxes((maps > chunk[:, None, None, None]).flatten(0, 1)).view(-1, n, 4)
                           for chunk in etas.split(step)]).to(maps.dtype)  # [T, N, 4]
    best = _max_iou(predicted, gt, valid).T  # [N, T]
    return (best[..., None] >= deltas).to(maps.dtype)


def max_box_accuracy(hits: torch.Tensor) -> torch.Tensor:
    """Dataset BoxAcc from the per-image hits [N, T, D] of ``box_accuracy``: mean over images, best map
    threshold for each IoU threshold, mean over IoU thresholds (MaxBoxAccV2 of Choe et al. 2020; with one
    delta = 0.5, their MaxBoxAcc)."""
    if not isinstance(hits, torch.Tensor) or hits.ndim != 3 or len(hits) == 0:
        raise ValueError("hits must be the [N, T, D] tensor of box_accuracy, N >= 1")
    return hits.mean(0).amax(0).mean()


def saliency_metric(maps: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """SM = log max(0.05, |B_p| / (hw)) - log p_c per image, lower is better (eq. 1.22); ``p`` [N] holds p_c in
    (0, 1]. A plain number, not a fraction."""
    n, h, w = _check_maps(maps)
    if not isinstance(p, torch.Tensor) or p.shape != (n,):
        raise ValueError(f"p must be a tensor [{n}] of class probabilities, one per map")
    if not ((p > 0) & (p <= 1)).all():
        raise ValueError("p must lie in (0, 1]")
    predicted = predicted_boxes(maps)
    area = (predicted[:, 2] - predicted[:, 0]) * (predicted[:, 3] - predicted[:, 1]) / (h * w)
    return area.clamp(min=0.05).log() - p.to(maps.device, maps.dtype).log()


register_metric(Metric(key="OM", name="official metric", index_type="official_metric", higher_is_better=False,
                       per_image=official_metric, needs=("maps", "boxes", "predictions", "labels"),
                       table="localisation", group="localisation", only_for="single-label"))
register_metric(Metric(key="LE", name="localisation error", index_type="localisation_error", higher_is_better=False,
                       per_image=localisation_error, needs=("maps", "boxes"), table="localisation",
                       group="localisation"))
register_metric(Metric(key="F1", name="pixel-wise F1", index_type="pixel_f1", higher_is_better=True,
                       per_image=pixel_f1, needs=("maps", "boxes"), table="localisation", group="localisation"))
register_metric(Metric(key="BA", name="MaxBoxAcc", index_type="max_box_accuracy", higher_is_better=True,
                       per_image=box_accuracy, needs=("maps", "boxes"), table="localisation", group="localisation",
                       reduce=max_box_accuracy))
register_metric(Metric(key="SP", name="pointing game", index_type="pointing_game", higher_is_better=True,
                       per_image=pointing_game, needs=("maps", "boxes"), table="localisation", group="localisation"))
register_metric(Metric(key="EP", name="energy pointing game", index_type="energy_pointing_game",
                       higher_is_better=True, per_image=energy_pointing_game, needs=("maps", "boxes"),
                       table="localisation", group="localisation"))
register_metric(Metric(key="SM", name="saliency metric", index_type="saliency_metric", higher_is_better=False,
                       per_image=saliency_metric, needs=("maps", "p"), table="localisation", group="localisation",
                       percent=False))


def relevance_rank_accuracy(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """RRA = |P_K & U| / K per image, with U the union of the boxes (the pixels whose centre lies in one), K = |U| and
    P_K the K pixels of highest saliency (Arras et al. 2022, "CLEVR-XAI", Information Fusion 81: relevance rank
    accuracy; their relevance mass accuracy is P, i.e. EP, for maps in [0, 1]). Ties at the K-th highest value: the
    tied pixels share the places left after the higher ones, each counted (K - #higher) / #tied, the mean over every
    order of the ties; so a constant map scores K / (H W). Quantus' ``RelevanceRankAccuracy`` takes numpy's argsort
    order among ties instead."""
    gt, valid = _gt_boxes(boxes, maps)
    union = _near_boxes(gt, valid, *maps.shape[1:]).flatten(1)
    size = union.sum(1, keepdim=True)
    if not (size > 0).all():
        raise ValueError("boxes of some image cover no pixel centre")
    flat = maps.flatten(1)
    kth = flat.sort(1, descending=True).values.gather(1, size - 1)
    higher, tied = flat > kth, flat == kth
    places = (size - higher.sum(1, keepdim=True)).to(maps.dtype) / tied.sum(1, keepdim=True)  # per tied pixel
    hits = (higher & union).sum(1, keepdim=True) + (tied & union).sum(1, keepdim=True) * places
    return (hits / size).squeeze(1)


register_metric(Metric(key="RRA", name="relevance rank accuracy", index_type="relevance_rank_accuracy",
                       higher_is_better=True, per_image=relevance_rank_accuracy, needs=("maps", "boxes"),
                       table="localisation", group="localisation"))
