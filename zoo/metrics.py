"""Recognition metrics from classifier scores: top-k accuracy (single-label) and average precision (multi-label,
Pascal VOC 2012 classification).

``scores`` are [N, C] logits or probabilities: only their order matters. Values are in percent.

- Top-k: per-image hits, so batches can be cached and averaged. A class scoring exactly as high as the
  label's counts as ranked above it: ties never help (a constant classifier scores 0).
- Average precision is a dataset quantity: keep every image's scores and targets and call it once.
  The default is the area under the non-interpolated precision-recall curve, sum_k (R_k - R_{k-1}) P_k over the
  distinct score thresholds (scikit-learn's ``average_precision_score``); ``interpolated=True`` gives the VOC
  2010-2012 devkit's all-point interpolated AP, where P_k is replaced by max_{j >= k} P_j. Items with equal
  scores enter together (one threshold); the devkit ranks them in sort order instead.
  ``difficult`` entries are ignored (neither positive nor negative), as the devkit's label 0. A class with
  no counted positive has no AP: NaN, left out of the mean.
"""

from collections.abc import Sequence

import torch

__all__ = ["average_precision", "mean_average_precision", "recognition", "top_k_accuracy"]

_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_scores(scores: torch.Tensor) -> tuple[int, int]:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point() or not scores.numel():
        got = f"{scores.dtype} tensor {list(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores)
        raise ValueError(f"scores must be a non-empty float tensor [N, C], got a {got}")
    if scores.isnan().any():
        raise ValueError("scores contain NaN")
    return scores.shape


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: int | Sequence[int] = (1, 5)) -> torch.Tensor:
    """Hits [N, len(ks)]: 100 when fewer than k other classes score at least as high as the label (ties count
    against), else 0; their mean over images is the top-k accuracy in percent."""
    n, c = _check_scores(scores)
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.dtype not in _INTEGERS:
        raise ValueError(f"labels must be an integer tensor [{n}], one class id per image")
    if ((labels < 0) | (labels >= c)).any():
        raise ValueError(f"labels must be class ids in [0, {c})")
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or not all(isinstance(k, int) and 1 <= k <= c for k in ks):
        raise ValueError(f"ks must be integers in [1, {c}], got {ks}")
    own = scores.gather(1, labels.to(scores.device, torch.long)[:, None])
    rank = (scores >= own).sum(1, keepdim=True) - 1  # other classes scoring at least as high
    return 100 * (rank < torch.tensor(ks, device=scores.device)).to(scores.dtype)


def _binary(name: str, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.shape != shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a tensor {list(shape)} like scores, got {got}")
    if not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (multi-hot)")
    return values.bool()


def average_precision(scores: torch.Tensor, targets: torch.Tensor, difficult: torch.Tensor | None = None,
                      interpolated: bool = False) -> torch.Tensor:
    """AP [C] per class, in percent, from scores [N, C] and multi-hot targets [N, C]; NaN for a class
    without counted positives. See the module docstring for the definitions."""
    n, _ = _check_scores(scores)
    positive = _binary("targets", targets, scores.shape).to(scores.device)
    counted = torch.ones_like(positive) if difficult is None else ~_binary("difficult", difficult, scores.shape)
    counted = counted.to(scores.device)
    order = scores.argsort(0, descending=True)
    ranked = scores.gather(0, order)
    hits = (positive & counted).gather(0, order)
    seen = counted.gather(0, order).cumsum(0)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    precision = hits.cumsum(0) / seen.clamp(min=1).to(dtype)
    # the last rank whose score equals this rank's: equal scores enter at one threshold
    ascending = ranked.T.flip(1).contiguous()
    end = (n - 1 - torch.searchsorted(ascending, ranked.T.contiguous())).T
    if interpolated:
        at_threshold = end == torch.arange(n, device=scores.device)[:, None]
        precision = torch.where(at_threshold, precision, 0).flip(0).cummax(0).values.flip(0)
    positives = hits.sum(0)
    ap = (precision.gather(0, end) * hits).sum(0) / positives.clamp(min=1)
    return 100 * torch.where(positives > 0, ap, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, difficult: torch.Tensor | None = None,
                           interpolated: bool = False) -> torch.Tensor:
    """mAP in percent: the mean of ``average_precision`` over the classes that have counted positives."""
    ap = average_precision(scores, targets, difficult, interpolated)
    if ap.isnan().all():
        raise ValueError("no class has a positive (non-difficult) example: mAP is undefined")
    return ap.nanmean()


def recognition(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A set of images' recognition results, in percent: ``top1`` and ``top5`` (as far as there are classes) for
    class ids [N], ``mAP`` for multi-hot labels [N, C]."""
    if labels.ndim == 2:
        return {"mAP": mean_average_precision(scores, labels).item()}
    ks = tuple(k for k in (1, 5) if k <= scores.shape[1])
    hits = top_k_accuracy(scores, labels, ks).mean(0)
    return {f"top{k}": hit.item() for k, hit in zip(ks, hits, strict=True)}
