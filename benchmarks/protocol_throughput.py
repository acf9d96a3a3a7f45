"""Throughput of the thesis' evaluation protocol through the harness, projected to ImageNet's validation set.

    python benchmarks/protocol_throughput.py [--quick] [--device cpu|cuda] [--out results/benchmark]
        [--models M ...] [--methods M ...] [--images METHOD=N ...] [--batch-size 32] [--size 224]
        [--precision float32|bfloat16] [--workers W] [--data DIR] [--threads T] [--against REV [--rounds 2]]

For each (model, method), one run of the harness's own code path (``zoo.evaluation.harness.run``) with the
thesis' protocol at ``--size`` px: the method's maps, AD / AG / AI and insertion / deletion (the "released"
preset), the ground-truth class explained (the harness's default). First a warm-up run of one batch under
``torch.utils.flop_counter.FlopCounterMode``: the model FLOPs actually run per image (convolutions, matmuls,
attention; forward and backward). Then the timed run of N images into a fresh folder: images/s is N over its wall
time, which includes loading the model and the harness's fixed costs (results, the examples figure), so the
projection to the 50,000 images of ImageNet's validation set is conservative. TFLOP/s achieved = FLOPs per image
x images/s, and its share of the device's dense tensor-core peak (``PEAKS``; for a CPU or another GPU unknown,
never guessed; float32 is set against the FP32 peak unless ``torch.backends.cuda.matmul.allow_tf32`` is on, although
cuDNN runs float32 convolutions on TF32 tensor cores by default). Per model, "whole protocol" adds up its methods
as separate runs. Beside them, the thesis' time per image of the method alone (Tables 2.1, 2.2) and ours (the
harness's ``seconds_per_image``), and whether the data loader alone (same dataset, preprocessing, batch and
workers) reads images faster than the whole protocol uses them.

Models are random-initialised timm models with 1000 classes (no weights can be downloaded here). The work per image
depends little on the weights: Score-CAM runs each distinct mask of an image once (constant channels share one),
and on the float32 path Opti-CAM stops an image once its loss stops changing. The images are natural photographs:
an ImageNet-style folder (``val/c0000 .. val/c0999``, one JPEG each, about 500x375) of random crops and flips of
the photographs that ship with matplotlib, written into a temporary folder, or ``--data DIR`` to keep it. The
defaults (ResNet-50 and ViT-B/16 at 224 px, batch 32, 256 images for Grad-CAM, Grad-CAM++ and Fake-CAM, 64 for
Score-CAM and Opti-CAM) are sized to take under 8 minutes on an H200 (an estimate); ``--quick`` checks the script on
a CPU at toy sizes, on one thread (on a shared CPU, ``--threads 1`` gives much steadier timings).

``--against REV`` measures the same runs at the working tree and at the git revision REV (exported with ``git
archive``) side by side, in child processes alternated over ``--rounds`` rounds, and reports each side's fastest
images/s and their ratio (>= 1: the working tree is no slower); it takes about 2 x rounds times as long. Writes a
JSON file, a Markdown table and a bar chart of the projected hours into ``--out``, named by the time of the run.
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from matplotlib.figure import Figure
from measure import device_name, save_run, timed, write_photos
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import zoo
from zoo.data import build_dataset, collate
from zoo.data.transforms import eval_transform
from zoo.evaluation import harness

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_VAL = 50_000  # images in ImageNet's validation set, the projection's target
CLASSES = 1000
MODELS = ["resnet50", "vit_base_patch16_224"]
METHODS = ["gradcam", "gradcampp", "scorecam", "opticam", "fakecam"]
IMAGES = {"gradcam": 256, "gradcampp": 256, "scorecam": 64, "opticam": 64, "fakecam": 256}
OPTICAM_ITERATIONS = 100  # Opti-CAM's default, as the thesis runs it
PHOTO_SIZE = (500, 375)  # width, height: ImageNet's most common
# toy sizes: at 32 px ResNet-18's last stage is 1x1, so its CAMs are constant (and Score-CAM runs one mask per image);
# one CPU thread, as a CPU shared with other jobs runs two threads' tiny operations many times slower
QUICK = dict(models=["resnet18", "vit_tiny_patch16_224"], size=32, images=2, batch_size=2, opticam_iterations=2,
             photo_size=(80, 60), threads=1)
METRIC_GROUPS = ["faithfulness", "curves"]  # AD / AG / AI and insertion / deletion
CURVES = "released"

# Thesis Tables 2.1 (ResNet-50) and 2.2 (ViT-B), T column: seconds per batch of 8 images, the method alone (without
# the metrics), as the thesis reports them; never ours.
THESIS_BATCH = 8
THESIS_SECONDS_PER_BATCH = {
    "resnet50": {"fakecam": 0.00, "gradcam": 0.03, "gradcampp": 0.03, "scorecam": 15.22, "opticam": 4.15},
    "vit_base_patch16_224": {"fakecam": 0.00, "gradcam": 0.14, "gradcampp": 0.15, "scorecam": 23.69,
                             "opticam": 16.05},
}

# Dense (no sparsity) peaks in FLOP/s, from NVIDIA's datasheets: H100 and H200 Tensor Core GPU, SXM form factor
# (BF16 1979 and TF32 989 TFLOPS with sparsity, FP32 67 TFLOPS); A100 Tensor Core GPU (BF16 312, TF32 156, FP32
# 19.5 TFLOPS; PCIe and SXM alike). Matched against torch.cuda.get_device_name(), first match first; the variants
# with other peaks (PCIe, NVL, Grace Hopper) are unknown here.
HOPPER_SXM = {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}
PEAKS = [(r"\bGH200\b|\bH100 PCIe\b|\bH100 NVL\b|\bH200 NVL\b", None), (r"\bH100\b", HOPPER_SXM),
         (r"\bH200\b", HOPPER_SXM), (r"\bA100\b", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12})]


def peak_flops(name: str, precision: str, tf32: bool = False) -> float | None:
    """The dense tensor-core peak (FLOP/s) of the GPU called ``name`` at ``precision`` ("float32" with ``tf32``:
    the TF32 peak); None for a device without one in ``PEAKS``."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, name):
            return None if peaks is None else peaks["tf32" if precision == "float32" and tf32 else precision]
    return None


def projected_seconds(images_per_s: float, images: int = IMAGENET_VAL) -> float:
    """Seconds for ``images`` images at ``images_per_s``."""
    return images / images_per_s


def share_of_peak(flops_per_s: float, peak: float | None) -> float | None:
    """Achieved FLOP/s as a share of the peak; None where the peak is unknown."""
    return None if peak is None else flops_per_s / peak


def model_args_for(model: str, size: int) -> dict:
    """``img_size`` for a model that takes one (a ViT) and is built for another size than ``size``."""
    with torch.device("meta"):
        network = timm.create_model(model)
    takes_size = "img_size" in inspect.signature(type(network).__init__).parameters
    return {"img_size": size} if takes_size and network.pretrained_cfg["input_size"][-1] != size else {}


def harness_takes_precision() -> bool:
    """Whether the harness's protocol has a precision (older harnesses, ``--against``, run float32 only)."""
    return "precision" in {field.name for field in dataclasses.fields(harness.Protocol)}


def chosen_precision(args, device: torch.device) -> str:
    """``--precision``, else the harness's default for the device; float32 where the harness has no precision or
    no default (older harnesses, ``--against``)."""
    default = getattr(harness, "default_precision", None)
    if not harness_takes_precision():
        return "float32"
    return args.precision or (default(device) if default else "float32")


def protocol_for(args, root: Path, model: str, method: str, limit: int, precision: str):
    """The harness's protocol for one (model, method); ``precision`` only where the harness has the field."""
    options = {"opticam": {"iterations": args.opticam_iterations}} if method == "opticam" else {}
    return harness.Protocol(model=model, weights=None, num_classes=CLASSES, dataset="imagenet-folder",
                            data_root=str(root), split="val", limit=limit, methods=[method], method_options=options,
                            metrics=METRIC_GROUPS, curves=CURVES, batch_size=args.batch_size,
                            data_config={"input_size": (3, args.size, args.size)},
                            model_args=model_args_for(model, args.size),
                            **({"precision": precision} if harness_takes_precision() else {}))


class _GlobalOnly:
    """FlopCounterMode's module tracker, replaced: its hooks break ``torch.autograd.grad`` with respect to a layer's
    output (pytorch/pytorch#131753), which Grad-CAM takes; only the global count is read here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts every operator globally, without per-module attribution."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def measure_runs(args, root: Path, device: torch.device) -> list[dict]:
    """For each (model, method): the warm-up run of one batch, counting FLOPs, then the timed run of N images."""
    accelerator = Accelerator(cpu=device.type == "cpu")
    dataset = build_dataset("imagenet-folder", root, "val")
    precision = chosen_precision(args, device)
    rows = []
    for model in args.models:
        for method in args.methods:
            count = args.images[method]
            print(f"{model} {method}: {count} images at {args.size} px, batch {args.batch_size}, {precision} ...",
                  flush=True)
            with tempfile.TemporaryDirectory(prefix="protocol-throughput-") as scratch:
                with flop_counter() as counter:
                    harness.run(protocol_for(args, root, model, method, args.batch_size, precision), dataset,
                                Path(scratch) / "warm-up", accelerator, args.workers)
                protocol = protocol_for(args, root, model, method, count, precision)
                timed_run = partial(harness.run, protocol, dataset, Path(scratch) / "timed", accelerator, args.workers)
                seconds, run_dir = timed(timed_run, device)
                results = json.loads((run_dir / "results.json").read_text())
            rows.append(dict(model=model, method=method, images=results["images"], size=args.size,
                             batch_size=args.batch_size, precision=precision,
                             flops_per_image=counter.get_total_flops() / args.batch_size, seconds=seconds,
                             images_per_s=results["images"] / seconds,
                             method_seconds_per_image=results["methods"][method]["seconds_per_image"]))
            print(f"  {rows[-1]['images_per_s']:.3g} images/s, {rows[-1]['flops_per_image'] / 1e9:.3g} GFLOP/image",
                  flush=True)
    return rows


def loader_speed(args, root: Path, model: str, precision: str, device: torch.device) -> dict:
    """Images/s of the harness's loader alone over every image of the folder, with ``model``'s preprocessing,
    decoded where the harness decodes by default (on a GPU, the GPU: ``zoo.data.device``)."""
    from zoo.data.device import decoding_transforms  # here: the --against children import zoo from before it existed

    dataset = build_dataset("imagenet-folder", root, "val")
    resolved, _ = harness.resolve(protocol_for(args, root, model, args.methods[0], None, precision), dataset)
    dataset.transforms = decoding_transforms("auto", dataset, eval_transform(resolved.data_config), device)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
    seconds, count = timed(lambda: sum(len(images.to(device)) for images, _ in loader), device)
    return dict(model=model, images=count, batch_size=args.batch_size, workers=args.workers,
                images_per_s=count / seconds)


def export_revision(rev: str, folder: Path) -> Path:
    """Revision ``rev``'s package laid out as installed (evaluation/, training/, app/ as zoo.evaluation, zoo.training,
    zoo.app) in ``folder/pkg``: the folder to put on PYTHONPATH."""
    tree, package = folder / "tree", folder / "pkg" / "zoo"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copytree(tree / "zoo", package)
    for name in ("evaluation", "training", "app"):
        shutil.copytree(tree / name, package / name)
    return package.parent


def child_argv(args, root: Path) -> list[str]:
    """The measurement's arguments, as a child process takes them."""
    return ["--device", args.device, "--models", *args.models, "--methods", *args.methods,
            "--images", *(f"{method}={count}" for method, count in args.images.items()),
            "--batch-size", str(args.batch_size), "--size", str(args.size), "--workers", str(args.workers),
            "--data", str(root), *(["--quick"] if args.quick else []),
            *(["--precision", args.precision] if args.precision else []),
            *(["--threads", str(args.threads)] if args.threads else [])]


def against(args, root: Path) -> dict:
    """The runs measured at the working tree ("current") and at ``args.against`` ("baseline") in child processes,
    alternated over ``args.rounds`` rounds (the order swapped every round): each side's runs per round, and where
    each imported zoo from."""
    sides = {"current": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="protocol-throughput-against-") as folder:
        baseline_path = export_revision(args.against, Path(folder))
        environments = {"current": os.environ.copy(),
                        "baseline": {**os.environ, "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(baseline_path), os.environ.get("PYTHONPATH")]))}}
        for round_ in range(args.rounds):
            for side in ("current", "baseline") if round_ % 2 == 0 else ("baseline", "current"):
                print(f"round {round_ + 1}/{args.rounds}: {side} "
                      f"({'working tree' if side == 'current' else args.against}) ...", flush=True)
                output = Path(folder) / f"{side}-{round_}.json"
                subprocess.run([sys.executable, __file__, *child_argv(args, root), "--child-json", str(output)],
                               env=environments[side], check=True)
                sides[side].append(json.loads(output.read_text()))
    zoo_folders = {side: {str(Path(run["zoo_file"]).parent) for run in runs} for side, runs in sides.items()}
    if zoo_folders["current"] != {str(Path(zoo.__file__).parent)}:
        raise RuntimeError(f"the working tree's runs imported zoo from {zoo_folders['current']}")
    if not all(Path(folder).is_relative_to(baseline_path) for folder in zoo_folders["baseline"]):
        raise RuntimeError(f"the runs at {args.against} imported zoo from {zoo_folders['baseline']}, "
                           f"not from the exported tree {baseline_path}")
    return dict(rev=args.against, rounds=args.rounds, zoo_folders={side: sorted(found) for side, found in
                                                                   zoo_folders.items()},
                runs={side: [run["rows"] for run in runs] for side, runs in sides.items()})


def fastest(runs: list[list[dict]]) -> dict[tuple[str, str], dict]:
    """Per (model, method), the row of the round with the most images/s."""
    best = {}
    for row in (row for rows in runs for row in rows):
        key = (row["model"], row["method"])
        if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
            best[key] = row
    return best


def comparison_rows(compared: dict) -> list[dict]:
    """Per (model, method): each side's fastest images/s and FLOPs per image, and current / baseline."""
    current, baseline = fastest(compared["runs"]["current"]), fastest(compared["runs"]["baseline"])
    return [dict(model=model, method=method, images=row["images"], current_precision=row["precision"],
                 baseline_precision=baseline[model, method]["precision"], current_images_per_s=row["images_per_s"],
                 baseline_images_per_s=baseline[model, method]["images_per_s"],
                 current_flops_per_image=row["flops_per_image"],
                 baseline_flops_per_image=baseline[model, method]["flops_per_image"],
                 ratio=row["images_per_s"] / baseline[model, method]["images_per_s"])
            for (model, method), row in current.items()]


def reported(row: dict, peak: float | None) -> dict:
    """A measured row with its projection to ImageNet's validation set, TFLOP/s, share of peak and the thesis'."""
    flops_per_s = row["flops_per_image"] * row["images_per_s"]
    thesis = THESIS_SECONDS_PER_BATCH.get(row["model"], {}).get(row["method"])
    return {**row, "projected_s": projected_seconds(row["images_per_s"]),
            "projected_h": projected_seconds(row["images_per_s"]) / 3600, "tflops_per_s": flops_per_s / 1e12,
            "share_of_peak": share_of_peak(flops_per_s, peak),
            "thesis_seconds_per_image": None if thesis is None else thesis / THESIS_BATCH}


def whole_protocol(rows: list[dict], peak: float | None) -> list[dict]:
    """Per model, its methods as separate runs over ImageNet's validation set: hours, images/s, TFLOP/s, share."""
    totals = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        seconds = sum(row["projected_s"] for row in mine)
        flops_per_s = sum(row["flops_per_image"] * IMAGENET_VAL for row in mine) / seconds
        fastest_row = max(mine, key=lambda row: row["images_per_s"])
        totals.append(dict(model=model, methods=[row["method"] for row in mine], projected_s=seconds,
                           projected_h=seconds / 3600, images_per_s=IMAGENET_VAL / seconds,
                           tflops_per_s=flops_per_s / 1e12, share_of_peak=share_of_peak(flops_per_s, peak),
                           fastest_method=fastest_row["method"], fastest_images_per_s=fastest_row["images_per_s"]))
    return totals


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(setting: str, rows: list[dict], totals: list[dict], loader: list[dict], compared: list[dict],
             rev: str | None) -> str:
    lines = [setting, "", "| model | method | images | px | images/s | projected 50k (h) | TFLOP/s | share of peak "
             "| thesis s/image | ours, method alone s/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['images']} | {r['size']} | {r['images_per_s']:.3g} | "
              f"{r['projected_h']:.2f} | {r['tflops_per_s']:.3g} | {_number(r['share_of_peak'], '.1%')} | "
              f"{_number(r['thesis_seconds_per_image'], '.4f')} | {r['method_seconds_per_image']:.4f} |" for r in rows]
    lines += ["", "| model | whole protocol (methods) | projected 50k (h) | images/s | TFLOP/s | share of peak |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t['model']} | {', '.join(t['methods'])} | {t['projected_h']:.2f} | {t['images_per_s']:.3g} | "
              f"{t['tflops_per_s']:.3g} | {_number(t['share_of_peak'], '.1%')} |" for t in totals]
    lines += [""] + [f"Loader alone ({entry['model']}'s preprocessing, batch {entry['batch_size']}, {entry['workers']} "
                     f"workers, {entry['images']} images): {entry['images_per_s']:.3g} images/s; the whole protocol "
                     f"uses {entry['protocol_images_per_s']:.3g} images/s (the fastest method alone, "
                     f"{entry['fastest_method']}, {entry['fastest_images_per_s']:.3g}): "
                     f"{'keeps up' if entry['keeps_up'] else 'does NOT keep up'}." for entry in loader]
    if compared:
        lines += ["", f"| model | method | images | working tree images/s | {rev} images/s | working tree / {rev} "
                      f"| precision (working tree / {rev}) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['method']} | {c['images']} | {c['current_images_per_s']:.3g} | "
                  f"{c['baseline_images_per_s']:.3g} | {c['ratio']:.2f}x | {c['current_precision']} / "
                  f"{c['baseline_precision']} |" for c in compared]
    return "\n".join(lines)


def figure(rows: list[dict], setting: str) -> Figure:
    """Projected hours for ImageNet's validation set per (model, method)."""
    fig = Figure(figsize=(1.6 + 0.7 * len(rows), 3.8))
    ax = fig.subplots()
    ax.bar(range(len(rows)), [row["projected_h"] for row in rows])
    ax.set_xticks(range(len(rows)), [f"{row['method']}\n{row['model']}" for row in rows], fontsize=7, rotation=30,
                  ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(f"projected hours, {IMAGENET_VAL:,} images")
    ax.set_title(f"Evaluation protocol {setting}", fontsize=7, wrap=True)
    return fig


def image_count(text: str) -> tuple[str, int]:
    """``METHOD=N`` of ``--images``: a method of ``METHODS`` and 1 <= N <= the folder's images."""
    method, _, count = text.partition("=")
    if method not in METHODS or not count.isdigit() or not 1 <= int(count) <= CLASSES:
        raise argparse.ArgumentTypeError(f"expected METHOD=N with a method of {', '.join(METHODS)} and "
                                         f"1 <= N <= {CLASSES}, got {text!r}")
    return method, int(count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes on a CPU: checks the script, measures nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", help=f"timm names (default: {' '.join(MODELS)})")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--images", nargs="+", type=image_count, default=[], metavar="METHOD=N",
                        help=f"images per method (default: {', '.join(f'{m}={n}' for m, n in IMAGES.items())})")
    parser.add_argument("--batch-size", type=int, help="default: 32")
    parser.add_argument("--size", type=int, help="image size in pixels (default: 224)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"),
                        help="the harness's precision (default: the harness's default for the device)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 4 on a GPU, 0 on a CPU)")
    parser.add_argument("--data", type=Path, help="the folder of photographs, kept (default: a temporary one)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--against", metavar="REV", help="also measure at git revision REV, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of --against")
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)  # a child of --against writes its runs
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    args.models = args.models or (QUICK["models"] if args.quick else MODELS)
    args.size = args.size or (QUICK["size"] if args.quick else 224)
    args.batch_size = args.batch_size or (QUICK["batch_size"] if args.quick else 32)
    args.images = {**(dict.fromkeys(METHODS, QUICK["images"]) if args.quick else IMAGES), **dict(args.images)}
    args.opticam_iterations = QUICK["opticam_iterations"] if args.quick else OPTICAM_ITERATIONS
    args.threads = args.threads or (QUICK["threads"] if args.quick else None)
    if args.against and subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.against}^{{commit}}"],
                                       cwd=ROOT, capture_output=True).returncode:
        parser.error(f"--against: {args.against!r} is not a git revision of {ROOT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else 0

    with nullcontext(args.data) if args.data else tempfile.TemporaryDirectory(prefix="photos-") as folder:
        root = Path(folder).resolve()
        write_photos(root, "val", CLASSES, QUICK["photo_size"] if args.quick else PHOTO_SIZE)
        if args.child_json:
            print(f"zoo imported from {Path(zoo.__file__).parent}", flush=True)
            rows = measure_runs(args, root, device)
            args.child_json.write_text(json.dumps(dict(zoo_file=zoo.__file__, rows=rows)))
            return
        if args.against:
            compared = against(args, root)
            measured = list(fastest(compared["runs"]["current"]).values())
        else:
            compared, measured = None, measure_runs(args, root, device)
        precision = chosen_precision(args, device)
        loader = [loader_speed(args, root, model, precision, device) for model in args.models]

    where = device_name(device)
    tf32 = precision == "float32" and torch.backends.cuda.matmul.allow_tf32
    peak = peak_flops(where, precision, tf32) if device.type == "cuda" else None
    peak_text = (f"{where}, {precision}{' on TF32 tensor cores' if tf32 else ''}: {peak / 1e12:.1f} TFLOP/s dense "
                 "(NVIDIA datasheet)" if peak else f"unknown for {where}: no share of peak")
    rows = [reported(row, peak) for row in measured]
    totals = whole_protocol(rows, peak)
    for entry, total in zip(loader, totals, strict=True):
        entry.update(protocol_images_per_s=total["images_per_s"], fastest_method=total["fastest_method"],
                     fastest_images_per_s=total["fastest_images_per_s"],
                     keeps_up=entry["images_per_s"] >= total["images_per_s"])
    setting = dict(device=where, date=time.strftime("%Y-%m-%d"), torch=torch.__version__, precision=precision,
                   peak_flops=peak, peak=peak_text, size=args.size, batch_size=args.batch_size, workers=args.workers,
                   targets="ground-truth", metrics=METRIC_GROUPS, curves=CURVES,
                   opticam_iterations=args.opticam_iterations)
    text = (f"Measured on {where}, {setting['date']}, torch {torch.__version__}, precision {precision}; peak: "
            f"{peak_text}. Random-initialised models, {CLASSES} classes; ground-truth class explained; metrics "
            f"{', '.join(METRIC_GROUPS)} ({CURVES} insertion/deletion); projected to {IMAGENET_VAL:,} images.")
    print(f"peak used: {peak_text}")
    comparison = comparison_rows(compared) if compared else []
    table = markdown(text, rows, totals, loader, comparison, args.against)
    print(table)
    results = dict(setting=setting, rows=rows, totals=totals, loader=loader)
    if compared:
        results["against"] = dict(compared, rows=comparison)
    save_run(args.out, "protocol_throughput", results, table, figure(rows, f"on {where}, {setting['date']}"))


if __name__ == "__main__":
    main()
