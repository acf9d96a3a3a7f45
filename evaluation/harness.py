"""The evaluation harness: one command from a model and a dataset to the thesis' tables.

    zoo-eval resnet50_castream --dataset cub --data-root data/ --methods gradcam scorecam fakecam

One protocol, recorded in full with the results: the model, its arguments and its weights (named as timm names
them: ``local-dir:<folder>``, ``hf-hub:<org>/<name>``, ``<arch>.<tag>``, or a folder or ``.safetensors`` file;
a checkpoint's own model arguments and input size, interpolation, crop and mean/std apply unless the command
line says otherwise), the dataset and split (with ``--limit``, a fixed sample across it), preprocessing, the
saliency methods and their options, which class is explained (ground truth by
default, the prediction with ``--targets predicted``), how its probability is read from the logits (softmax,
or on a multi-label dataset the sigmoid of its logit), the insertion/deletion preset, the precision (``PRECISIONS``:
on a GPU the fast path, bfloat16 autocast for the repeated forwards; ``--exact`` or a CPU: float32). A run lives in
``<out>/<protocol hash>/`` (the weights hashed by their content): every batch's per-image results are
cached there, so an interrupted run continues where it stopped (a damaged cached batch is named and
computed again), a different protocol never touches another's results, and several processes
(``accelerate launch -m zoo.evaluation.harness ...``) share the batches. When all batches are done it writes
``results.json``, ``results.md`` (the thesis' table layout) and ``examples.png``. Bad input (a flag, a
method's option, an empty split) is refused before anything is written.
"""

import argparse
import ast
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config
from torch.utils.data import DataLoader
from tqdm import tqdm

import zoo  # noqa: F401  (registers the zoo's models)
from zoo.data import DATASETS, build_dataset, collate, sample_indices
from zoo.data.device import DECODERS, decoding_transforms
from zoo.data.transforms import CONFIG_KEYS, eval_transform
from zoo.hub import Weights, load_model, resolve_weights, sha256
from zoo.metrics import METRICS, RECOGNITION, Metric, recognition, reported_value, tables
from zoo.output import checked_inputs, logits_of

from .figures import grid, overlay, save, show
from .metrics import (
    COMPUTED_INPUTS,
    DEFAULT_PROTOCOL,
    PROBABILITIES,
    PROTOCOLS,
    Explanations,
    check_probabilities,
    explains_again,
    perturbation_curves,
    target_probabilities,
)
from .saliency import METHODS, check_options, explain, mask_images, pixel_statistics

PRECISIONS = {  # how the harness runs the model; the fast path's maps and metrics agree with the exact path's within
    # the tolerances tests/test_harness.py states
    "float32": "the exact path: every pass through the model in float32, contiguous tensors",
    "bfloat16": "the fast path: the repeated forwards (Score-CAM's masked images, Opti-CAM's iterations, "
                "insertion/deletion's steps) under bfloat16 autocast and the model channels-last; the pass that "
                "captures activations and gradients, the maps and the metrics stay float32",
}
BOX_BASELINES = ("box", "box_complement")  # thesis Table 2.5: the ground truth itself as a saliency map
EXAMPLES = 6  # images shown per method in examples.png


def default_precision(device: torch.device) -> str:
    """``PRECISIONS``' fast path, "bfloat16", on a GPU that computes in it; the exact "float32" anywhere else (a
    CPU's bfloat16 is slower than its float32 unless it has AMX or AVX-512 BF16)."""
    fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bfloat16" if fast else "float32"


def autocast_methods() -> list[str]:
    """The saliency methods that take ``amp_dtype``: those whose repeated forwards the fast path autocasts."""
    return sorted(name for name, fn in METHODS.items() if "amp_dtype" in inspect.signature(fn).parameters)


def metric_groups(by_default: bool = False) -> list[str]:
    """The ``--metrics`` groups: those of the registry's interpretability metrics, in declaration order; with
    ``by_default``, only those computed when ``--metrics`` is not given."""
    return list(dict.fromkeys(metric.group for metric in METRICS.values()
                              if metric.group != RECOGNITION and (metric.by_default or not by_default)))


def box_groups() -> set[str]:
    """The groups measured on explanations with a ground-truth box: those with a metric that needs the boxes. Their
    other metrics (SM) leave the other explanations out too, so that a column group is measured on one set."""
    return {metric.group for metric in METRICS.values() if "boxes" in metric.needs}


@dataclass
class Protocol:
    """Everything that decides a number in the results; its hash names the run."""

    model: str
    weights: str | None  # any name ``zoo.hub.resolve_weights`` takes; None: a random initialisation
    num_classes: int
    dataset: str
    data_root: str
    split: str
    limit: int | None
    methods: list[str]
    method_options: dict = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["faithfulness", "curves"])
    targets: str = "ground-truth"
    curves: str = DEFAULT_PROTOCOL
    probabilities: str | None = None  # "softmax" or "sigmoid" (``dataset_probabilities``); None: ``run`` resolves it
    batch_size: int = 16
    data_config: dict = field(default_factory=dict)  # these fields; ``run`` takes the rest from the weights or model
    seed: int = 0  # of a random initialisation and of the ``limit`` sample: the same in every process and resumed run
    dataset_options: dict = field(default_factory=dict)  # passed to the dataset reader (e.g. a canvas's size)
    model_args: dict = field(default_factory=dict)  # timm.create_model's, over the checkpoint's (``run`` merges)
    weights_sha256: str | None = None  # of the safetensors file the weights resolve to; ``run`` fills it in
    precision: str = "float32"  # "bfloat16": the fast path (``PRECISIONS``); "float32": the exact one

    def key(self) -> str:
        """The run's name: a hash of every field, with the weights' content (``weights_sha256``) where known in
        place of their path, so new weights at the same path are a new run, and with the keys of the metrics its
        groups resolve to, under which the cached batches hold per-image values in natural units: a metric added
        to a group, or a run cached before this convention, is another run. ``probabilities`` counts unless it is
        "softmax", what every run used before the field existed: those runs keep their names (and caches), a
        sigmoid run is another run; likewise ``precision`` counts unless it is "float32". A ``limit`` counts as a
        sample across the split: runs from when it took the split's first images are other runs."""
        fields = asdict(self)
        if self.weights_sha256 is not None:
            del fields["weights"]
        if self.probabilities == "softmax":
            del fields["probabilities"]
        if self.precision == "float32":
            del fields["precision"]
        if self.limit is not None:
            fields["limit"] = {"sample of": self.limit}
        fields["metric_keys"] = [metric.key for metric in METRICS.values() if metric.group in self.metrics]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def measured(protocol: Protocol, method: str, multi_label: bool, num_classes: int) -> list[Metric]:
    """The metrics ``evaluate_batch`` computes for ``method``: those of the protocol's groups defined for the
    dataset's labels, except, for a box baseline, those that run the method again (a box cannot)."""
    return [metric for metric in METRICS.values() if metric.group in protocol.metrics
            and metric.applies(multi_label, num_classes)
            and not (method in BOX_BASELINES and explains_again(metric.needs))]


def dataset_probabilities(dataset) -> str:
    """How the harness reads the explained class's probability from a model's logits on ``dataset``, as the authors'
    code does (the thesis does not say): "sigmoid" of the class's logit on a multi-label dataset (multi-hot labels:
    its models are trained with binary cross-entropy per class), "softmax" over the classes otherwise."""
    return "sigmoid" if torch.as_tensor(dataset.load(0)[1]["label"]).ndim == 1 else "softmax"


def explained_classes(labels: torch.Tensor, logits: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, classes): which image and which class each explanation is for. Single-label: one per image,
    the label or the prediction. Multi-label (multi-hot labels): every positive class of an image for
    ground truth, the top prediction otherwise."""
    if mode == "predicted":
        return torch.arange(len(logits), device=logits.device), logits.argmax(1)
    if labels.ndim == 2:
        return labels.nonzero(as_tuple=True)
    return torch.arange(len(labels), device=labels.device), labels


def box_maps(boxes: list[torch.Tensor], box_labels: list[torch.Tensor], rows: torch.Tensor, classes: torch.Tensor,
             size: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ground-truth boxes of each explanation (those of its class where the dataset labels boxes by
    class, all the image's boxes otherwise), less those the crop emptied, and their union as a binary map
    [n, H, W]."""
    picked, maps = [], torch.zeros(len(rows), *size)
    ys, xs = torch.arange(size[0])[:, None] + 0.5, torch.arange(size[1])[None] + 0.5
    for i, (row, cls) in enumerate(zip(rows.tolist(), classes.tolist(), strict=True)):
        image_boxes = boxes[row].as_subclass(torch.Tensor).float()
        same_class = box_labels[row] == cls
        chosen = image_boxes[same_class] if same_class.any() else image_boxes
        chosen = chosen[(chosen[:, 2] > chosen[:, 0]) & (chosen[:, 3] > chosen[:, 1])]
        for x0, y0, x1, y1 in chosen.tolist():
            maps[i] = torch.maximum(maps[i], ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).float())
        picked.append(chosen)
    return maps, picked


def _check_finite(values: torch.Tensor, index: torch.Tensor, protocol: Protocol, problem: str) -> None:
    """Refuse non-finite ``values`` (one row per image), naming the images in ``problem``'s ``{images}``."""
    finite = values.flatten(1).isfinite().all(1).cpu()
    if not finite.all():
        images = ", ".join(map(str, index[~finite].tolist()))
        raise ValueError(problem.format(images=f"images {images} of {protocol.dataset} ({protocol.split})"))


def measure(model, images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, metrics: list[Metric],
            shared: dict, method: str | None = None, options: dict | None = None, curves: str = DEFAULT_PROTOCOL,
            probabilities: str = "softmax", amp_dtype: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-explanation values of ``metrics`` (by key) for ``maps`` [N, H, W] of ``images`` [N, C, H, W] explaining
    ``classes``, and the inputs (``zoo.metrics.INPUTS``) computed for them. ``shared`` holds the inputs that do not
    depend on the maps (``p``, and ``labels``, ``predictions``, ``boxes`` where a metric needs them); only what
    the metrics need is computed: the masked images' probabilities ``o``, the maps of the masked images
    (``method`` run again with ``options``), the insertion and deletion ``curves`` (a preset's name; their forwards
    under ``amp_dtype`` autocast if given), and the inputs declared with their function (``COMPUTED_INPUTS``)."""
    needs = {name for metric in metrics for name in metric.needs}
    inputs = {**shared, "maps": maps}
    if needs & {"o", "maps_of_masked"}:
        masked = mask_images(images, maps, *pixel_statistics(model, images))
    if "o" in needs:
        with torch.no_grad():
            inputs["o"] = target_probabilities(logits_of(model(masked)), classes, probabilities)
    if "maps_of_masked" in needs:
        inputs["maps_of_masked"] = explain(model, masked, method, classes, **(options or {}))
    if "curves" in needs:
        inputs["curves"] = perturbation_curves(model, images, maps, classes, curves, probabilities=probabilities,
                                               amp_dtype=amp_dtype)
    for name in sorted(needs & COMPUTED_INPUTS.keys()):
        explained = Explanations(model, images, maps, classes, method, options or {}, probabilities, amp_dtype,
                                 shared=inputs)
        inputs[name] = COMPUTED_INPUTS[name].compute(explained)
    return {metric.key: metric.values(inputs) for metric in metrics}, inputs


def evaluate_batch(model, images: torch.Tensor, target: dict, index: torch.Tensor, protocol: Protocol,
                   keep_examples: bool) -> dict[str, torch.Tensor]:
    """Per-image results of one batch (the dataset's images ``index``) for every method: ``image/...`` per
    image, ``row/...`` per explanation (``row/<method>/<metric key>``: the values of each metric ``measured``,
    in natural units), ``time/<method>`` seconds, ``example/...`` maps of the first images (batch 0 only). Only
    the inputs those metrics need are computed. Non-finite images or model outputs are refused, naming the images."""
    _check_finite(images, index, protocol, "{images} are not finite after preprocessing (NaN or Inf pixels): "
                                           "check the data config's mean and std")
    mean, std = pixel_statistics(model, images)
    with torch.no_grad():
        logits = logits_of(model(images))
    _check_finite(logits, index, protocol, f"outputs of {protocol.model} are not finite (NaN or Inf) for {{images}}")
    labels = target["label"].to(images.device)
    rows, classes = explained_classes(labels, logits, protocol.targets)
    explained = images[rows]
    p = target_probabilities(logits[rows], classes, protocol.probabilities)
    record = {"image/index": index, "image/logits": logits, "image/labels": labels, "row/rows": rows,
              "row/classes": classes, "row/p": p}
    shared = {"p": p, "labels": labels[rows], "predictions": logits.argmax(1)[rows]}
    on_boxes = bool(box_groups() & set(protocol.metrics))
    if on_boxes or set(protocol.methods) & set(BOX_BASELINES):
        truth, boxes = box_maps(target["boxes"], target["box_labels"], rows.cpu(), classes.cpu(), images.shape[-2:])
        truth = truth.to(images.device)
        localised = truth.flatten(1).any(1)  # a box left inside the crop
    if on_boxes:  # an explanation without a box is measured against the whole image, then left out by summarise
        record["row/localised"] = localised
        whole = torch.tensor([[0.0, 0.0, images.shape[-1], images.shape[-2]]])
        shared["boxes"] = [box if keep else whole for box, keep in zip(boxes, localised.tolist(), strict=True)]
    if keep_examples:
        record["example/images"] = (explained[:EXAMPLES] * std + mean).clamp(0, 1)
    for method in protocol.methods:
        metrics = measured(protocol, method, labels.ndim == 2, logits.shape[1])
        options = protocol.method_options.get(method, {})
        start = time.perf_counter()
        if method in BOX_BASELINES:
            maps = truth if method == "box" else 1 - truth
        else:
            maps = explain(model, explained, method, classes, **options)
        record[f"time/{method}"] = torch.tensor(time.perf_counter() - start)
        values, _ = measure(model, explained, maps, classes, metrics, shared, method, options, protocol.curves,
                            protocol.probabilities, None if protocol.precision == "float32" else protocol.precision)
        record.update({f"row/{method}/{key}": value for key, value in values.items()})
        if keep_examples:
            record[f"example/{method}"] = maps[:EXAMPLES]
    return {key: value.detach().cpu().clone(memory_format=torch.contiguous_format) for key, value in record.items()}


def _concatenated(records: list[dict], prefix: str) -> dict[str, torch.Tensor]:
    keys = [key for key in records[0] if key.startswith(prefix)]
    return {key.removeprefix(prefix): torch.cat([record[key] for record in records]) for key in keys}


def summarise(records: list[dict], protocol: Protocol) -> dict:
    """Dataset-level results from the per-batch records: every metric's ``reported_value``, as the thesis' tables
    print them. The groups measured on boxes (``box_groups``) leave out the explanations without a box inside the
    crop: ``excluded_from_localisation`` counts them and names their images. A metric leaves out the rows it did not
    measure (NaN), and is absent where it measured none."""
    images, rows = _concatenated(records, "image/"), _concatenated(records, "row/")
    localised = rows.get("localised")
    on_boxes = box_groups()
    methods = {}
    for method in protocol.methods:
        result = {}
        for metric in METRICS.values():
            values = rows.get(f"{method}/{metric.key}")
            if values is None:
                continue
            included = ~values.reshape(len(values), -1).isnan().any(1)  # NaN: an image the metric does not measure
            if metric.group in on_boxes:
                included &= localised
            if included.any():
                result[metric.key] = reported_value(metric, values, included)
        result["seconds_per_image"] = float(sum(record[f"time/{method}"] for record in records) / len(images["labels"]))
        methods[method] = result
    summary = {"images": len(images["labels"]), "explanations": len(rows["p"]),
               "recognition": recognition(images["logits"], images["labels"]), "methods": methods}
    if localised is not None:
        excluded = {i for record in records
                    for i in record["image/index"][record["row/rows"]][~record["row/localised"]].tolist()}
        summary["excluded_from_localisation"] = {"explanations": int((~localised).sum()), "images": sorted(excluded)}
    return summary


def result_tables() -> dict[str, list[Metric]]:
    """The thesis' tables of a run's interpretability results (faithfulness, localisation): their columns, from the
    registry's declarations."""
    return {title: columns for title, columns in tables().items() if title != RECOGNITION}


PER_BATCH = 8  # the thesis' T: seconds per batch of 8 images (Tables 2.1, 2.2)


def _cell(values: dict | None, name: str) -> str:
    if values is None or (name != "T" and name not in values):
        return "-"
    return f"{PER_BATCH * values['seconds_per_image'] if name == 'T' else values[name]:.2f}"


def run_labels(results: list[dict]) -> list[str]:
    """A name for each run that tells it from the others: its model; where another run has the same, the first 8
    hex digits of its weights' SHA-256 (or "random init"); where still the same, its run folder (protocol key)."""
    def weights(result: dict) -> str:
        digest = result["protocol"].get("weights_sha256")
        return f"weights {digest[:8]}" if digest else "random init"

    labels = [result["protocol"]["model"] for result in results]
    for detail in (weights, lambda result: f"run {result.get('key', '?')}"):
        labels = [f"{label} ({detail(result)})" if labels.count(label) > 1 else label
                  for label, result in zip(labels, results, strict=True)]
    return labels


def comparison(results: list[dict], by_model: bool = False) -> str:
    """Several runs side by side. By default grouped by method, as the thesis' Tables 3.1 and 4.1 set GAP
    against CA-Stream or a baseline against gradient denoising: one row per (method, run). ``by_model``:
    as Tables 2.2, 2.4 and 2.7 set ViT-B beside DeiT-B: one row per method, one column group per run (the
    faithfulness group with T, seconds per batch of 8 images). Runs are named by ``run_labels``."""
    lines, labels = [], run_labels(results)
    methods = dict.fromkeys(method for result in results for method in result["methods"])
    for title, columns in result_tables().items():
        present = [(metric.key, metric.arrow) for metric in columns
                   if any(metric.key in values for result in results for values in result["methods"].values())]
        if not present:
            continue
        lines += ["", f"## {title.capitalize()}", ""]
        if by_model:
            group = present + [("T", "")] * (title == "faithfulness")
            lines += ["| method | " + " | ".join(f"{label} {name}{arrow}" for label in labels
                                                for name, arrow in group) + " |",
                      "|---" * (len(group) * len(results) + 1) + "|"]
            lines += [f"| {method} | " + " | ".join(_cell(result["methods"].get(method), name) for result in results
                                                    for name, _ in group) + " |" for method in methods]
            continue
        lines += ["| method | model | " + " | ".join(f"{name}{arrow}" for name, arrow in present) + " |",
                  "|---" * (len(present) + 2) + "|"]
        for method in methods:
            for label, result in zip(labels, results, strict=True):
                if method in result["methods"]:
                    cells = [_cell(result["methods"][method], name) for name, _ in present]
                    lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def compare_main(argv: list[str] | None = None) -> None:
    """``zoo-eval-table RESULTS.json ...``: print runs side by side (e.g. GAP vs CA-Stream; with
    ``--by-model``, ViT-B vs DeiT-B as Tables 2.2 and 2.7)."""
    parser = argparse.ArgumentParser(prog="zoo-eval-table", description=comparison.__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by zoo-eval")
    parser.add_argument("--by-model", action="store_true", help="one row per method, one column group per run")
    args = parser.parse_args(argv)
    print(comparison([json.loads(path.read_text()) for path in args.results], args.by_model))


def markdown(summary: dict, protocol: Protocol) -> str:
    """Results in the layout of the thesis' tables (2.1, 3.1: faithfulness; 2.6: localisation)."""
    recognition = ", ".join(f"{name} {value:.2f}" for name, value in summary["recognition"].items())
    lines = [f"# {protocol.model} on {protocol.dataset} ({protocol.split}, {summary['images']} images)", "",
             f"Recognition: {recognition}. Explained class: {protocol.targets}; its probability: "
             f"{protocol.probabilities}; insertion/deletion preset: {protocol.curves}; precision: "
             f"{protocol.precision} ({PRECISIONS[protocol.precision].partition(':')[0]}). Measured by this run "
             f"(interpretable-zoo harness), protocol {protocol.key()}."]
    for title, columns in result_tables().items():
        present = [(metric.key, metric.arrow) for metric in columns
                   if any(metric.key in result for result in summary["methods"].values())]
        if not present:
            continue
        lines += ["", f"## {title.capitalize()}", "",
                  "| method | " + " | ".join(f"{name}{arrow}" for name, arrow in present) + " | s/image |",
                  "|---" * (len(present) + 2) + "|"]
        for method, result in summary["methods"].items():
            cells = [f"{result[name]:.2f}" if name in result else "-" for name, _ in present]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {result['seconds_per_image']:.3f} |")
    excluded = summary.get("excluded_from_localisation", {}).get("images")
    if excluded:
        lines += ["", f"{summary['excluded_from_localisation']['explanations']} of {summary['explanations']} "
                      "explanations have no ground-truth box inside the crop and are left out of the localisation "
                      f"metrics (images {', '.join(map(str, excluded))} of the split)."]
    return "\n".join(lines) + "\n"


def examples_figure(record: dict, methods: list[str], path: Path) -> None:
    """The first images of the run, each method's map overlaid (one row per method)."""
    images = record["example/images"].permute(0, 2, 3, 1)
    figure, axes = grid(len(methods) + 1, len(images), cell=(1.8, 1.9))
    for column, image in enumerate(images):
        show(axes[0, column], image)
        for row, method in enumerate(methods, start=1):
            overlay(axes[row, column], image, record[f"example/{method}"][column])
    for row, title in enumerate(["image", *methods]):
        axes[row, 0].set_ylabel(title, fontsize=8)
    save(figure, path)


def check_run(protocol: Protocol, dataset, workers: int) -> None:
    """Refuse, before anything is written, what would fail later or measure something else than asked: a limit or
    batch size below 1, negative workers, an empty split, metrics that need ground-truth boxes on a dataset
    without, an unknown way to read probabilities, an unknown precision, an unknown method, a method option outside
    its limits."""
    for name, value, low in (("limit", protocol.limit, 1), ("batch_size", protocol.batch_size, 1),
                             ("workers", workers, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if len(dataset) == 0:
        raise ValueError(f"{protocol.dataset} has no image in its {protocol.split} split at {protocol.data_root}")
    on_boxes = [group for group in protocol.metrics if group in box_groups()]
    if on_boxes and not len(dataset.load(0)[1]["boxes"]):
        raise ValueError(f"{protocol.dataset} ({protocol.split} split at {protocol.data_root}) has no ground-truth "
                         f"boxes, which the {', '.join(on_boxes)} metrics need: leave them out of --metrics")
    if protocol.probabilities is not None:
        check_probabilities(protocol.probabilities)
    if protocol.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {protocol.precision!r}")
    for method in dict.fromkeys([*protocol.methods, *protocol.method_options]):
        if method not in BOX_BASELINES or method in protocol.method_options:
            check_options(method, protocol.method_options.get(method, {}))


def _missing(record: dict, protocol: Protocol, first: bool) -> list[str]:
    """What a finished batch holds and ``record`` lacks: the images' and explanations' keys, every method's time
    and ``measured`` metrics, in the ``first`` batch the examples."""
    needed = ["image/index", "image/logits", "image/labels", "row/rows", "row/classes", "row/p",
              *(f"time/{method}" for method in protocol.methods),
              *(["example/images", *(f"example/{method}" for method in protocol.methods)] if first else [])]
    missing = [key for key in needed if key not in record]
    if missing:
        return missing
    multi_label, num_classes = record["image/labels"].ndim == 2, record["image/logits"].shape[1]
    needed = [*(["row/localised"] if box_groups() & set(protocol.metrics) else []),
              *(f"row/{method}/{metric.key}" for method in protocol.methods
                for metric in measured(protocol, method, multi_label, num_classes))]
    return [key for key in needed if key not in record]


def cached(path: Path, indices: list[int], protocol: Protocol, first: bool) -> bool:
    """Whether ``path`` holds the finished batch of the images ``indices``: complete safetensors with every
    method's results for those images (and, in the ``first`` batch, the examples). A damaged file is named in a
    one-line notice (it will be computed again)."""
    if not path.exists():
        return False
    try:
        record = load_file(path)
    except (SafetensorError, OSError) as error:
        damage = f"not complete safetensors: {' '.join(str(error).split())}"
    else:
        missing = _missing(record, protocol, first)
        if missing:
            damage = f"without {', '.join(missing)}"
        elif record["image/index"].tolist() != indices:
            damage = f"holds images {record['image/index'].tolist()}, not {indices}"
        else:
            damage = None
    if damage:
        print(f"{path} is damaged ({damage}): computing it again")
    return damage is None


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(unfinished)``, then that file renamed to ``path``, so that an interrupted write never looks
    finished; a failed one (a full disk) is removed and named. ``unfinished`` is this process's own, so that two
    processes writing the same file (two runs on one output folder) each rename a whole one."""
    unfinished = path.with_suffix(f".{os.getpid()}.partial")
    try:
        write(unfinished)
    except (OSError, SafetensorError) as error:
        unfinished.unlink(missing_ok=True)
        raise OSError(f"could not write {path} ({' '.join(str(error).split())}): what the run wrote before is "
                      "intact, and the same command continues from it once the file can be written") from error
    unfinished.replace(path)


def finished(results: Path) -> bool:
    """Whether the run's ``results.json`` is there and complete; a damaged one is named (and written again)."""
    if not results.exists():
        return False
    try:
        json.loads(results.read_text())["methods"]
    except (ValueError, KeyError, TypeError) as error:
        print(f"{results} is damaged ({error}): writing it again from the cached batches")
        return False
    return True


def evaluated_indices(dataset, limit: int | None, seed: int = Protocol.seed) -> list[int]:
    """The images of ``dataset`` a run evaluates, in order: all of them, or with a ``limit`` a sample across the
    split drawn from the protocol's ``seed`` (``zoo.data.sample_indices``, the sample ``zoo-train --limit``
    draws)."""
    return sample_indices(len(dataset), limit or len(dataset), seed)


def resolve(protocol: Protocol, dataset) -> tuple[Protocol, Weights | None]:
    """The protocol as it is run, and its weights (``zoo.hub.resolve_weights``: resolved and checked once):
    ``probabilities`` where None from the dataset's labels (``dataset_probabilities``), ``weights_sha256`` where
    None the SHA-256 of their safetensors file, ``model_args`` over the checkpoint's own (where it is one of this
    model), ``data_config`` completed from the weights' pretrained config (input size, interpolation, crop,
    mean/std), else the model's; on the fast path (``precision`` "bfloat16"), ``amp_dtype`` of every method that
    takes one (``autocast_methods``) where its options do not set it, so that results.json says how each ran."""
    weights = None if protocol.weights is None else resolve_weights(protocol.model, protocol.weights)
    model_args = protocol.model_args if weights is None else weights.model_args_for(protocol.model,
                                                                                     **protocol.model_args)
    with torch.device("meta"):
        model = timm.create_model(protocol.model, num_classes=protocol.num_classes, **model_args,
                                  pretrained_cfg_overlay=None if weights is None else weights.data_cfg)
    config = resolve_data_config(protocol.data_config, model=model)
    resolved = replace(protocol, model_args=model_args, data_config={key: config[key] for key in CONFIG_KEYS},
                       probabilities=protocol.probabilities or dataset_probabilities(dataset))
    if resolved.weights_sha256 is None and weights is not None:
        resolved = replace(resolved, weights_sha256=sha256(weights.file))
    if protocol.precision != "float32":
        options = {method: dict(values) for method, values in protocol.method_options.items()}
        for method in sorted(set(protocol.methods) & set(autocast_methods())):
            options.setdefault(method, {}).setdefault("amp_dtype", protocol.precision)
        resolved = replace(resolved, method_options=options)
    return resolved, weights


def run(protocol: Protocol, dataset, out: Path, accelerator: Accelerator, workers: int = 0,
        decode: str = "auto") -> Path:
    """Evaluate every batch of ``dataset`` not cached yet (this process's share), then, on the main process,
    write the results. Returns the run's folder. Bad input is refused first (``check_run``), then the protocol is
    completed (``resolve``) before the run's folder is named. The images are ``evaluated_indices``, decoded where
    ``decode`` says (``zoo.data.device.decoding_transforms``; the results do not depend on it beyond the decoders'
    rounding)."""
    check_run(protocol, dataset, workers)
    protocol, weights = resolve(protocol, dataset)
    dataset.transforms = decoding_transforms(decode, dataset, eval_transform(protocol.data_config), accelerator.device)
    run_dir, main = out / protocol.key(), accelerator.is_main_process
    batches_dir = run_dir / "batches"
    if main:
        batches_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "protocol.json").write_text(json.dumps(asdict(protocol), indent=2))
    if finished(run_dir / "results.json"):
        if main:
            print(f"{run_dir} already holds the results of this protocol; nothing to do")
        return run_dir
    torch.manual_seed(protocol.seed)
    model = load_model(protocol.model, weights, protocol.num_classes, **protocol.model_args)  # as resolved
    model = model.to(accelerator.device).eval()
    if protocol.precision != "float32":
        model = model.to(memory_format=torch.channels_last)
    chosen = evaluated_indices(dataset, protocol.limit, protocol.seed)
    batches = [chosen[start:start + protocol.batch_size] for start in range(0, len(chosen), protocol.batch_size)]
    todo = [k for k in range(accelerator.process_index, len(batches), accelerator.num_processes)
            if not cached(batches_dir / f"{k:06d}.safetensors", batches[k], protocol, first=k == 0)]
    loader = DataLoader(dataset, batch_sampler=[batches[k] for k in todo], collate_fn=collate, num_workers=workers)
    for k, (images, target) in zip(todo, tqdm(loader, desc=f"{protocol.model} batches", disable=not main),
                                   strict=True):
        with checked_inputs():  # evaluate_batch refuses non-finite images itself, once, naming them
            record = evaluate_batch(model, images.to(accelerator.device), target, torch.tensor(batches[k]), protocol,
                                    keep_examples=k == 0)
        write_atomically(batches_dir / f"{k:06d}.safetensors", partial(save_file, record))
    accelerator.wait_for_everyone()
    if main:
        records = [load_file(batches_dir / f"{k:06d}.safetensors") for k in range(len(batches))]
        summary = summarise(records, protocol)
        examples_figure(records[0], protocol.methods, run_dir / "examples.png")
        (run_dir / "results.md").write_text(markdown(summary, protocol))
        results = json.dumps(dict(protocol=asdict(protocol), key=protocol.key(), versions=_versions(), **summary),
                             indent=2)
        write_atomically(run_dir / "results.json", lambda unfinished: unfinished.write_text(results))
    return run_dir


def _versions() -> dict:
    from importlib.metadata import version

    return {package: version(package) for package in ("interpretable-zoo", "torch", "timm", "torchvision")}


def _option(text: str) -> tuple[str, str, object]:
    method, _, assignment = text.partition(".")
    key, _, value = assignment.partition("=")
    if not (method and key and value):
        raise argparse.ArgumentTypeError(f"expected METHOD.OPTION=VALUE (e.g. opticam.iterations=50), got {text!r}")
    try:
        return method, key, json.loads(value)
    except json.JSONDecodeError:
        return method, key, value


def _keyword(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--model-kwargs``, the value read as timm's scripts read it: a Python literal, else JSON
    (``true``, ``null``), else the text itself."""
    key, _, value = text.partition("=")
    if not (key.isidentifier() and value):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. img_size=96), got {text!r}")
    if key == "num_classes":
        raise argparse.ArgumentTypeError("num_classes is the dataset's class count, not a model argument to set")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def integer(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return integer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoo-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a registered model name, e.g. resnet50_castream or resnet50")
    parser.add_argument("--weights", help="as timm names them: local-dir:FOLDER, hf-hub:ORG/NAME, ARCH.TAG or "
                                          "'default' (the model's own tag); or a checkpoint folder, an ORG/NAME Hub "
                                          "id, a .safetensors file. A checkpoint's config.json model arguments "
                                          "and input size, crop and mean/std apply (the flags below win). Random "
                                          "initialisation when left out")
    parser.add_argument("--model-kwargs", nargs="+", action="extend", type=_keyword, default=[], metavar="KEY=VALUE",
                        help="arguments of timm.create_model, as timm's scripts take them (e.g. img_size=96 "
                             "dynamic_img_size=True; the image size the data is resized to is --img-size's)")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", help="default: the dataset's evaluation split")
    parser.add_argument("--methods", nargs="+", help=f"saliency methods ({', '.join(sorted(METHODS))}) and the "
                                                     f"ground-truth baselines {', '.join(BOX_BASELINES)}")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="METHOD.OPTION=VALUE")
    parser.add_argument("--metrics", nargs="+", choices=metric_groups(),
                        help="groups of metrics (default: the thesis' groups the dataset allows: "
                             f"{', '.join(metric_groups(by_default=True))})")
    parser.add_argument("--targets", choices=("ground-truth", "predicted"), default="ground-truth")
    parser.add_argument("--curves", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="insertion/deletion preset (default: %(default)s)")
    parser.add_argument("--probabilities", choices=list(PROBABILITIES),
                        help="the explained class's probability, for AD/AG/AI, ADCC, SM and insertion/deletion: "
                             "softmax over the classes or sigmoid of its logit (default: sigmoid on a multi-label "
                             "dataset, softmax otherwise)")
    parser.add_argument("--limit", type=_at_least(1), help="only N images, a fixed sample across the split (the "
                                                           "classes of a split stored class by class)")
    parser.add_argument("--img-size", type=_at_least(1), help="default: the weights' (their config.json's), else "
                                                              "the model's")
    parser.add_argument("--batch-size", type=_at_least(1), default=16)
    parser.add_argument("--workers", type=_at_least(0), help="DataLoader worker processes (default: 4 on a GPU, where "
                                                             "reading the files in the main process would hold it up; "
                                                             "0 on a CPU)")
    parser.add_argument("--decode", choices=DECODERS, default="auto",
                        help="where the images are decoded and preprocessed: in the workers, or on the device "
                             "(JPEG files, nvJPEG on a GPU); auto: on a GPU, the device where it can (default)")
    parser.add_argument("--out", type=Path, default=Path("results/eval"))
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where a GPU is available")
    parser.add_argument("--exact", action="store_true",
                        help="the exact float32 path everywhere; without it, a GPU takes the fast path (bfloat16 "
                             "autocast for the repeated forwards, channels-last), a CPU the exact one. results.json "
                             "records which (protocol.precision)")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    workers = args.workers if args.workers is not None else 4 if accelerator.device.type == "cuda" else 0
    reader = DATASETS[args.dataset]
    split = args.split or next(s for s in reader.splits if s != "train")
    dataset = build_dataset(args.dataset, args.data_root, split)
    has_boxes = len(dataset) > 0 and len(dataset.load(0)[1]["boxes"]) > 0
    without_boxes = [] if has_boxes else [group for group in metric_groups() if group in box_groups()]
    metrics = args.metrics or [group for group in metric_groups(by_default=True) if group not in without_boxes]
    methods = args.methods or ["gradcam", "gradcampp", "fakecam"]
    unknown = [m for m in methods if m not in METHODS and m not in BOX_BASELINES]
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; known: {', '.join(sorted(METHODS))}, "
                     f"{', '.join(BOX_BASELINES)}")
    if set(methods) & set(BOX_BASELINES) and not has_boxes:
        parser.error(f"{args.dataset} has no ground-truth boxes for {', '.join(BOX_BASELINES)}")
    options = {}
    for method, key, value in args.option:
        options.setdefault(method, {})[key] = value
    protocol = Protocol(
        model=args.model, weights=args.weights, num_classes=len(dataset.classes), dataset=args.dataset,
        data_root=str(Path(args.data_root).resolve()), split=split, limit=args.limit,
        methods=methods, method_options=options, metrics=metrics, targets=args.targets, curves=args.curves,
        probabilities=args.probabilities, batch_size=args.batch_size, model_args=dict(args.model_kwargs),
        data_config={} if args.img_size is None else dict(input_size=(3, args.img_size, args.img_size)),
        precision="float32" if args.exact else default_precision(accelerator.device),
    )
    try:
        check_run(protocol, dataset, workers)
    except ValueError as error:
        parser.error(str(error))
    if accelerator.is_main_process and without_boxes and args.metrics is None:
        print(f"{args.dataset} has no ground-truth boxes: {', '.join(without_boxes)} metrics are not computed")
    run_dir = run(protocol, dataset, args.out, accelerator, workers, args.decode)
    if accelerator.is_main_process:
        print((run_dir / "results.md").read_text())
        print(f"results in {run_dir}: results.json, results.md, examples.png")


if __name__ == "__main__":
    main()
