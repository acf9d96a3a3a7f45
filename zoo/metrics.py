"""The zoo's metrics: one registry, one unit convention, and the recognition metrics.

**Registry.** A metric is declared once, as a ``Metric`` given to ``register_metric``; ``METRICS`` holds the
declarations by key, in declaration order. The harness (``zoo-eval``), its tables and the model cards read
everything from there: what to compute, from which inputs, how to report it, in which column. The recognition
metrics are declared below; the interpretability metrics declare themselves in ``zoo.evaluation.metrics``, so
importing that package registers them (as ``import zoo`` registers the models with timm).

**Units.** A metric's per-image function returns one value per image (per explanation) in natural units: a fraction
in [0, 1] where the thesis reports a percentage (``percent=True``), a plain number otherwise (the saliency metric, a
log ratio); NaN for an image it does not measure (one placed in no grid), which the harness leaves out.
``reported_value`` is the one place where they become the reported number: the metric's reduction over the images
(their mean unless declared otherwise), times 100 for a percentage.

**Recognition** from classifier ``scores`` [N, C] (logits or probabilities: only their order matters):

- Top-k: per-image hits, 1 when fewer than k other classes score at least as high as the label. A class scoring
  exactly as high as the label's counts as ranked above it: ties never help (a constant classifier scores 0).
- Average precision is a dataset quantity: its per-image values are each image's scores beside its labels, and its
  reduction computes it. The default is the area under the non-interpolated precision-recall curve, sum_k (R_k -
  R_{k-1}) P_k over the distinct score thresholds (scikit-learn's ``average_precision_score``); ``interpolated=True``
  gives the VOC 2010-2012 devkit's all-point interpolated AP, where P_k is replaced by max_{j >= k} P_j. Items with
  equal scores enter together (one threshold); the devkit ranks them in sort order instead. ``difficult`` entries are
  ignored (neither positive nor negative), as the devkit's label 0. A class with no counted positive has no AP:
  NaN, left out of the mean.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["INPUTS", "METRICS", "RECOGNITION", "Metric", "average_precision", "check_class_ids",
           "mean_average_precision", "recognition", "register_metric", "reported_value", "scored_labels", "tables",
           "top_k_accuracy"]

INPUTS = {  # what a per-image function may take, by parameter name: one row per image or per explanation
    "scores": "classifier scores of each image [N, C]",
    "labels": "the true labels of each row's image: class ids [N], or multi-hot [N, C] on a multi-label dataset",
    "predictions": "the predicted class of each row's image [N]",
    "p": "the explained class's probability on the image [N]",
    "o": "the explained class's probability on the image masked by its map [N]",
    "maps": "the saliency maps at image resolution [N, H, W], in [0, 1]",
    "maps_of_masked": "the same method's maps of the images masked by their maps [N, H, W]",
    "curves": "the insertion and deletion curves of the explained class's probability (PerturbationCurves)",
    "boxes": "the ground-truth boxes of each row: N tensors [n_i, 4], XYXY in pixels",
}
LABELLINGS = ("single-label", "multi-label")
RECOGNITION = "recognition"  # the table of the metrics computed from classifier scores, which every run reports


def mean(values: torch.Tensor) -> torch.Tensor:
    """The default reduction: the mean over the images."""
    return values.mean()


@dataclass(frozen=True, kw_only=True)
class Metric:
    """A metric's declaration: everything the harness, its tables and the model cards need to know about it."""

    key: str  # the results files' key and the tables' column, e.g. "AD"
    name: str  # for people, e.g. "average drop"
    index_type: str  # the metric type of a Hub card's model-index, e.g. "average_drop"
    higher_is_better: bool
    per_image: Callable[..., torch.Tensor]  # takes the inputs ``needs`` names, by keyword; returns per-image values
    needs: tuple[str, ...]  # names in INPUTS: what the harness must compute for it
    table: str  # the table it is a column of ("recognition", "faithfulness", "localisation"), in declaration order
    group: str  # the ``zoo-eval --metrics`` group that computes it
    percent: bool = True  # per-image fractions, reported times 100; False: a plain number, reported as it is
    only_for: str | None = None  # "single-label" or "multi-label"; None: any dataset
    min_classes: int = 1  # defined with at least this many classes (top-5)
    reduce: Callable[[torch.Tensor], torch.Tensor] = mean  # per-image values -> the dataset's value
    by_default: bool = True  # computed when ``zoo-eval --metrics`` is not given (False: a costly, opt-in group)

    def __post_init__(self):
        unknown = [name for name in self.needs if name not in INPUTS]
        if unknown:
            raise ValueError(f"metric {self.key!r} needs unknown inputs {', '.join(unknown)}; known: "
                             f"{', '.join(INPUTS)}")
        if self.only_for not in (None, *LABELLINGS):
            raise ValueError(f"metric {self.key!r}: only_for must be None or one of {', '.join(LABELLINGS)}, got "
                             f"{self.only_for!r}")

    @property
    def arrow(self) -> str:
        """The tables' mark of its direction: ↑ higher is better, ↓ lower."""
        return "↑" if self.higher_is_better else "↓"

    def applies(self, multi_label: bool, num_classes: int) -> bool:
        """Whether it is defined on a dataset with these labels."""
        return num_classes >= self.min_classes and self.only_for in (None, LABELLINGS[multi_label])

    def values(self, inputs: Mapping[str, object]) -> torch.Tensor:
        """Per-image values from ``inputs`` (by INPUTS names; those it does not need are left aside)."""
        return self.per_image(**{name: inputs[name] for name in self.needs})


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to ``METRICS`` (after those declared before it); a key can be registered once."""
    if metric.key in METRICS:
        raise ValueError(f"a metric {metric.key!r} is registered already ({METRICS[metric.key].name})")
    METRICS[metric.key] = metric
    return metric


def tables() -> dict[str, list[Metric]]:
    """Every table's columns, its metrics in declaration order; the tables in the order of their first metric."""
    columns = {}
    for metric in METRICS.values():
        columns.setdefault(metric.table, []).append(metric)
    return columns


def reported_value(metric: Metric, values: torch.Tensor, included: torch.Tensor | None = None) -> float:
    """The number reported for a set of images from their per-image ``values`` (one row each): the metric's
    reduction over the rows ``included`` (a boolean mask; default: all), times 100 for a percentage."""
    if included is not None:
        values = values[included.to(values.device)]
    if len(values) == 0:
        raise ValueError(f"no image to report {metric.key} ({metric.name}) on")
    reduced = metric.reduce(values)
    return float(100 * reduced if metric.percent else reduced)


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_class_ids(name: str, ids: torch.Tensor, count: int, num_classes: int | None = None) -> None:
    """ValueError naming ``name`` unless ``ids`` is an integer tensor [count] of class ids (below ``num_classes``)."""
    if not isinstance(ids, torch.Tensor) or ids.shape != (count,) or ids.dtype not in _INTEGERS:
        raise ValueError(f"{name} must be an integer tensor [{count}], one class id per row")
    if num_classes is None and (ids < 0).any():
        raise ValueError(f"{name} must be non-negative class ids")
    if num_classes is not None and ((ids < 0) | (ids >= num_classes)).any():
        raise ValueError(f"{name} must be class ids in [0, {num_classes})")


def _check_scores(scores: torch.Tensor) -> tuple[int, int]:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point() or not scores.numel():
        got = f"{scores.dtype} tensor {list(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores)
        raise ValueError(f"scores must be a non-empty float tensor [N, C], got a {got}")
    if scores.isnan().any():
        raise ValueError("scores contain NaN")
    return scores.shape


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: int | Sequence[int] = (1, 5)) -> torch.Tensor:
    """Hits [N, len(ks)]: 1 when fewer than k other classes score at least as high as the label (ties count
    against), else 0; their mean over images is the top-k accuracy."""
    n, c = _check_scores(scores)
    check_class_ids("labels", labels, n, c)
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or not all(isinstance(k, int) and 1 <= k <= c for k in ks):
        raise ValueError(f"ks must be integers in [1, {c}], got {ks}")
    own = scores.gather(1, labels.to(scores.device, torch.long)[:, None])
    rank = (scores >= own).sum(1, keepdim=True) - 1  # other classes scoring at least as high
    return (rank < torch.tensor(ks, device=scores.device)).to(scores.dtype)


def _binary(name: str, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.shape != shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a tensor {list(shape)} like scores, got {got}")
    if not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (multi-hot)")
    return values.bool()


def average_precision(scores: torch.Tensor, targets: torch.Tensor, difficult: torch.Tensor | None = None,
                      interpolated: bool = False) -> torch.Tensor:
    """AP [C] per class, a fraction, from scores [N, C] and multi-hot targets [N, C]; NaN for a class without
    counted positives. See the module docstring for the definitions."""
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
    return torch.where(positives > 0, ap, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, difficult: torch.Tensor | None = None,
                           interpolated: bool = False) -> torch.Tensor:
    """mAP, a fraction: the mean of ``average_precision`` over the classes that have counted positives."""
    ap = average_precision(scores, targets, difficult, interpolated)
    if ap.isnan().all():
        raise ValueError("no class has a positive (non-difficult) example: mAP is undefined")
    return ap.nanmean()


def scored_labels(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, 2, C]: each image's scores beside its multi-hot labels, the per-image values mAP is reduced from."""
    _check_scores(scores)
    return torch.stack([scores, _binary("labels", labels, scores.shape).to(scores)], 1)


register_metric(Metric(key="top1", name="top-1 accuracy", index_type="accuracy", higher_is_better=True,
                       per_image=lambda scores, labels: top_k_accuracy(scores, labels, 1)[:, 0],
                       needs=("scores", "labels"), table=RECOGNITION, group=RECOGNITION, only_for="single-label"))
register_metric(Metric(key="top5", name="top-5 accuracy", index_type="top_5_accuracy", higher_is_better=True,
                       per_image=lambda scores, labels: top_k_accuracy(scores, labels, 5)[:, 0],
                       needs=("scores", "labels"), table=RECOGNITION, group=RECOGNITION, only_for="single-label",
                       min_classes=5))
register_metric(Metric(key="mAP", name="mAP", index_type="mean_average_precision", higher_is_better=True,
                       per_image=scored_labels, needs=("scores", "labels"), table=RECOGNITION, group=RECOGNITION,
                       only_for="multi-label", reduce=lambda rows: mean_average_precision(rows[:, 0], rows[:, 1])))


def recognition(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A set of images' recognition results, in percent: every recognition metric defined for these labels
    (``top1`` and ``top5`` for class ids [N], as far as there are classes; ``mAP`` for multi-hot labels [N, C])."""
    inputs, multi_label = {"scores": scores, "labels": labels}, labels.ndim == 2
    return {metric.key: reported_value(metric, metric.values(inputs)) for metric in tables()[RECOGNITION]
            if metric.applies(multi_label, scores.shape[1])}
