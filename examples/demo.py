"""The whole product on real images, offline, on a laptop CPU: ``make demo``, or

    python examples/demo.py [--out results/demo] [--quick] [--data FOLDER]

Data -> GAP baseline -> CA-Stream and SimPool -> gradient denoising -> evaluation -> model cards -> reload through
timm -> figures, on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``, installed with apt when it is
missing and apt is at hand; torchvision's download otherwise):

1. a ResNet-18 of quarter width with GAP (dilated last stage: output stride 16, so a 6x6 last map at 96 px) is
   trained from scratch on single-item canvases (``fashion-canvas``: an item among clutter, exact box), then a
   CA-Stream is trained on top of it, backbone frozen, with the training recipes' loop (``runs/gap`` and
   ``runs/castream`` in ``--out``; ``experiments/castream_attention.py`` retrains the latter's recipe at other
   learning rates); SimPool (timm's ``SimPool2d``) is trained on the same frozen backbone with the same recipe
   (``runs/simpool``);
2. ``resnet18_cifar`` (quarter width) is trained on Fashion-MNIST at 32 px without and with gradient denoising
   (cosine, lambda 7.5e-3, thesis ch. 4);
3. the harness evaluates each: accuracy; AD / AG / AI / insertion / deletion for Grad-CAM, Grad-CAM++,
   Score-CAM, Opti-CAM, Fake-CAM and the built-in saliency; on the canvases also the pointing games and box
   metrics, against the chance level of a box of that size, and the grid pointing game (2x2 grids of canvases);
   the GAP model's Grad-CAM, guided backpropagation and gradient maps go through the randomisation sanity check
   (MPRT, eMPRT);
4. each checkpoint gets its Hub folder and model card (``zoo-publish --dry-run``), is loaded back with
   ``timm.create_model("local-dir:...", pretrained=True)`` and must give identical logits and saliency;
5. ``summary.md`` / ``summary.json`` (GAP, SimPool and CA-Stream side by side) and the figures
   ``saliency_gap_vs_castream.png``, ``saliency_baseline_vs_denoised.png`` and ``metrics.png`` are written into
   ``--out``.

Every stage is resumable: a finished training run or evaluation in ``--out`` is reused, never redone or
overwritten. ``--quick`` runs a much smaller version of the same pipeline (for the tests). The demo uses only the
library's public API.
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

import zoo  # noqa: F401  (registers the zoo's models with timm)
from zoo.data import box_share, build_dataset, dataset_images, find_fashion_mnist
from zoo.evaluation import publish
from zoo.evaluation.figures import grid, overlay, pixels, save, show
from zoo.evaluation.harness import Protocol, evaluated_indices, result_tables, run
from zoo.evaluation.saliency import explain
from zoo.hub import hub_id, read_config
from zoo.metrics import METRICS
from zoo.training.config import Recipe
from zoo.training.run_folder import finished_model
from zoo.training.train import train


@dataclass(frozen=True)
class Scale:
    """How much the demo trains and evaluates."""

    canvas: int  # canvas side, px
    train_images: int  # canvases (and Fashion-MNIST images for the CIFAR models) per training epoch
    epochs_gap: int
    epochs_stream: int
    epochs_cifar: int
    eval_images: int  # test images each model is evaluated on
    opticam_iterations: int
    val_images: int  # test images each training run validates on after every epoch
    batch_size: int = 32


SCALES = {
    "full": Scale(canvas=96, train_images=6000, epochs_gap=7, epochs_stream=3, epochs_cifar=3, eval_images=64,
                  opticam_iterations=100, val_images=1000),
    "quick": Scale(canvas=64, train_images=256, epochs_gap=1, epochs_stream=1, epochs_cifar=1, eval_images=8,
                   opticam_iterations=5, val_images=64, batch_size=16),
}
CAM_METHODS = ["gradcam", "gradcampp", "scorecam", "opticam", "fakecam"]
GAP_BACKBONE = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}  # ResNet-18 at 1/4 width
CIFAR_WIDTHS = {"widths": [16, 32, 64, 128]}  # resnet18_cifar at a quarter of its width
GD_WEIGHT = 7.5e-3  # the thesis' lambda for ResNet-18 (Table 4.1)
# The stream's lr: at 0.1 (the thesis', for batch 256) its last attention leaves the object of these canvases
# (pointing game at or below chance), at 1e-3 it stays on it, at the same accuracy (README, "The demo";
# measured by experiments/castream_attention.py).
STREAM_LR = 1e-3
SHOWN = 6  # images per figure
CHARTED = ("AD", "AG", "I", "D")  # the metrics of metrics.png
POOLINGS = {"gap": "GAP", "simpool": "SimPool", "castream": "CA-Stream"}  # the poolings compared on one backbone
POSTHOC = ("AD", "AG", "I", "D", "GPG")  # the comparison's columns for Grad-CAM, then those of the built-in map
BUILT_IN = ("SP", "EP", "GPG")
SANITY_METHODS = ["gradcam", "guided_backprop", "gradient"]  # Adebayo et al.: the first should fail to stay alike


def train_stage(out: Path, name: str, **settings) -> Path:
    """Train one recipe into ``out/runs/<name>`` (a finished run of it there is reused); its model folder."""
    recipe = Recipe(name=name, output_dir=str(out / "runs" / name), workers=0, **settings)
    if (model := finished_model(recipe)) is not None:
        print(f"{name}: reusing the finished run in {recipe.output_dir}")
        return model
    print(f"\n== training {name}")
    return train(recipe)


def common_settings(scale: Scale) -> dict:
    """Recipe settings every training stage of the demo shares."""
    return dict(batch_size=scale.batch_size, limit=scale.train_images, val_limit=scale.val_images, checkpoint_every=0,
                lr=0.05, milestones=[], data_config={"crop_pct": 1.0})


def canvas_settings(scale: Scale, root: str, canvas: dict) -> dict:
    """Recipe settings of the stages trained on the canvases (the GAP baseline and the stream); ``canvas``: the
    canvases' dataset options."""
    return dict(common_settings(scale), dataset="fashion-canvas", data_root=root, val_split="test",
                dataset_options=canvas, augmentation="cifar", image_size=scale.canvas, weight_decay=1e-4)


def evaluate_stage(out: Path, model_dir: Path, dataset: str, root: str, options: dict, scale: Scale,
                   methods: list[str], metrics: list[str]) -> Path:
    """Evaluate a trained model with the harness on the test split (its model arguments and preprocessing those
    its config.json records, as the harness reads a ``local-dir:`` checkpoint); the results.json path."""
    config = read_config(model_dir)
    protocol = Protocol(
        model=config["architecture"], weights=f"local-dir:{model_dir.resolve()}", num_classes=config["num_classes"],
        dataset=dataset, data_root=root, split="test", limit=scale.eval_images, methods=methods,
        method_options={"opticam": {"iterations": scale.opticam_iterations}}, metrics=metrics,
        batch_size=scale.batch_size, dataset_options=options,
    )
    print(f"\n== evaluating {model_dir.parent.name} on {dataset}: {', '.join(methods)}")
    dataset_object = build_dataset(dataset, root, "test", **options)
    return run(protocol, dataset_object, out / "eval", Accelerator()) / "results.json"


def publish_and_reload(out: Path, model_dir: Path, results: Path, dataset: str, root: str, options: dict) -> dict:
    """Hub folder and card (dry run), then the checkpoint loaded back through timm: identical outputs or an error."""
    config = read_config(model_dir)
    name = f"{config['architecture']}.fmnist_demo_{model_dir.parent.name}"
    hub_dir = out / "hub" / name
    if not hub_dir.exists():
        publish.main([str(model_dir), hub_id(name), "--results", str(results), "--out", str(hub_dir), "--dry-run"])
    reloaded, saved = (timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
                       for folder in (hub_dir, model_dir))
    images, _ = dataset_images(dataset, root, config["pretrained_cfg"], range(SHOWN), **options)
    with torch.no_grad():
        identical = all(torch.equal(a, b) for a, b in zip(reloaded(images), saved(images), strict=True))
    if not identical:
        raise RuntimeError(f"{hub_dir} loaded through timm gives other outputs than {model_dir}")
    return {"hub_folder": str(hub_dir), "card": str(hub_dir / "README.md"), "reloaded_identical": identical}


def saliency_grid(columns: dict[str, tuple[Path, str]], dataset: str, root: str, options: dict, path: Path,
                  title: str) -> None:
    """One row per test image: the image (with its box), then each column's map (model folder, method)."""
    data_config = read_config(next(iter(columns.values()))[0])["pretrained_cfg"]
    images, targets = dataset_images(dataset, root, data_config, range(SHOWN), **options)
    maps = {}
    for heading, (model_dir, method) in columns.items():
        model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
        maps[heading] = explain(model, images, method)
    figure, axes = grid(SHOWN, len(columns) + 1)
    for row, (image, target) in enumerate(zip(pixels(images, data_config), targets, strict=True)):
        show(axes[row, 0], image, target["boxes"])
        for column, heading in enumerate(maps, start=1):
            overlay(axes[row, column], image, maps[heading][row])
    for column, heading in enumerate(["image", *maps]):
        axes[0, column].set_title(heading, fontsize=8)
    figure.suptitle(title, fontsize=9)
    save(figure, path)


def metrics_chart(models: dict[str, dict], path: Path) -> None:
    """AD, AG, insertion and deletion of every method of every model, as grouped bars."""
    metrics = [METRICS[key] for key in CHARTED]
    figure, axes = grid(1, len(metrics), cell=(4.2, 4))
    labels = [f"{model}\n{method}" for model, entry in models.items() for method in entry["methods"]]
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [entry["methods"][method].get(metric.key, float("nan")) for entry in models.values()
                  for method in entry["methods"]]
        colors = [f"C{i}" for i, entry in enumerate(models.values()) for _ in entry["methods"]]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels if ax is axes[0, 0] else [""] * len(values), fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{metric.key}: {metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)",
                     fontsize=9)
    save(figure, path)


def localisation_bar(pointing: float, chance: float, images: int) -> dict:
    """The demo's quality bar: the built-in attention's pointing game (%) beats the chance level (%) by more than
    three standard errors of a chance-level hit rate on ``images`` images."""
    margin = 300 * math.sqrt(chance / 100 * (1 - chance / 100) / images)
    return {"SP": pointing, "chance": chance, "margin": margin, "images": images, "holds": pointing > chance + margin}


def pooling_comparison(models: dict[str, dict]) -> dict[str, dict]:
    """GAP, SimPool and CA-Stream on the same frozen backbone: accuracy, Grad-CAM's faithfulness and grid pointing
    game (``POSTHOC``), the built-in map's localisation (``BUILT_IN``; GAP has none)."""
    rows = {}
    for name, label in POOLINGS.items():
        methods = models[name]["methods"]
        row = {"top1": models[name]["recognition"]["top1"],
               **{f"Grad-CAM {key}": methods["gradcam"].get(key) for key in POSTHOC}}
        row.update({f"built-in {key}": methods.get("attention", {}).get(key) for key in BUILT_IN})
        rows[label] = row
    return rows


def sanity_check(results: Path) -> dict:
    """The randomisation sanity check's results per method, and whether it separates Grad-CAM (its maps change
    with the weights: lower MPRT similarity) from guided backpropagation (Adebayo et al. 2018)."""
    methods = json.loads(results.read_text())["methods"]
    keys = [metric.key for metric in METRICS.values() if metric.group == "sanity"]
    values = {method: {key: methods[method][key] for key in keys} for method in SANITY_METHODS}
    return {"results": str(results), "methods": values,
            "separates": values["gradcam"]["MPRT"] < values["guided_backprop"]["MPRT"]}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(summary: dict) -> str:
    lines = [f"# interpretable-zoo demo ({summary['scale']} run)", "",
             f"{summary['machine']}; {summary['minutes']:.1f} minutes. Every number below is copied from the "
             "results file named with it (ours, measured; no figure of the thesis here).", ""]
    for model, entry in summary["models"].items():
        recognition = ", ".join(f"{k} {v:.2f}" for k, v in entry["recognition"].items())
        lines += [f"## {model}", "", f"{entry['description']}. Test images: {entry['images']}; {recognition}. "
                  f"Results: `{entry['results']}`. Hub folder: `{entry['hub_folder']}` (reloaded through timm: "
                  f"{'identical outputs' if entry['reloaded_identical'] else 'DIFFERENT outputs'}).", ""]
        columns = [metric for metrics in result_tables().values() for metric in metrics
                   if any(metric.key in values for values in entry["methods"].values())]
        lines += ["| method | " + " | ".join(f"{metric.key}{metric.arrow}" for metric in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {method} | " + " | ".join(f"{values[m.key]:.2f}" if m.key in values else "-" for m in columns)
                  + " |" for method, values in entry["methods"].items()]
        lines.append("")
    bar = summary["attention_localises"]
    lines += [f"Pointing-game chance level on these canvases (mean share of the image covered by the box): "
              f"{bar['chance']:.2f} %. Quality bar: the CA-Stream's built-in attention points into the box on "
              f"{bar['SP']:.2f} % of the {bar['images']} test canvases; clearly above chance means above "
              f"{bar['chance'] + bar['margin']:.2f} % (chance plus three standard errors of a chance-level hit rate): "
              f"{'**holds**' if bar['holds'] else '**does not hold**'}.", ""]
    pooling = summary["pooling"]
    columns = list(next(iter(pooling.values())))
    lines += ["## Pooling on one frozen backbone: GAP, SimPool, CA-Stream", "",
              "| pooling | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_number(row[column]) for column in columns) + " |"
              for label, row in pooling.items()]
    sanity = summary["sanity_check"]
    keys = list(next(iter(sanity["methods"].values())))
    lines += ["", f"## Sanity check (model-parameter randomisation) of the GAP model's maps: `{sanity['results']}`",
              "", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join(_number(values[key]) for key in keys) + " |"
              for method, values in sanity["methods"].items()]
    lines += ["", f"Grad-CAM's maps {'change more' if sanity['separates'] else 'do NOT change more'} than guided "
              "backpropagation's when the weights are randomised (MPRT: lower is more change).", ""]
    lines += ["Figures: " + ", ".join(f"`{name}`" for name in summary["figures"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run of the same pipeline (about 3 minutes on a 2-core CPU)")
    parser.add_argument("--data", type=Path, help="a folder of Fashion-MNIST idx files (default: the Debian package's)")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files = find_fashion_mnist(args.data, install=True)
    root, plain, canvas = files.root, files.dataset, {"source": files.source, "size": scale.canvas}
    gap = train_stage(out, "gap", model="resnet18", model_args=GAP_BACKBONE, epochs=scale.epochs_gap,
                      **{**canvas_settings(scale, root, canvas), "milestones": [max(scale.epochs_gap - 2, 1)]})
    stream = train_stage(out, "castream", model="resnet18_castream", model_args=GAP_BACKBONE, weights=str(gap),
                         freeze_backbone=True, epochs=scale.epochs_stream,
                         **{**canvas_settings(scale, root, canvas), "lr": STREAM_LR})
    simpool = train_stage(out, "simpool", model="resnet18_simpool", model_args=GAP_BACKBONE, weights=str(gap),
                          freeze_backbone=True, epochs=scale.epochs_stream,
                          **{**canvas_settings(scale, root, canvas), "lr": STREAM_LR})
    cifar = dict(model="resnet18_cifar", model_args=CIFAR_WIDTHS, dataset=plain, data_root=root, val_split="test",
                 augmentation="cifar", epochs=scale.epochs_cifar, weight_decay=5e-4, objective="gradient_denoising",
                 **common_settings(scale))
    baseline = train_stage(out, "cifar_baseline", gd_weight=0.0, **cifar)
    denoised = train_stage(out, "cifar_denoised", gd_weight=GD_WEIGHT, **cifar)

    canvas_metrics = ["faithfulness", "curves", "localisation", "grid"]
    evaluated = {
        "gap": (gap, "fashion-canvas", canvas, CAM_METHODS, canvas_metrics,
                "ResNet-18 (quarter width, output stride 16) with GAP, trained on the canvases"),
        "simpool": (simpool, "fashion-canvas", canvas, [*CAM_METHODS, "attention"], canvas_metrics,
                    "SimPool (timm's SimPool2d) in place of GAP on the frozen GAP model above, built-in saliency: "
                    "its attention"),
        "castream": (stream, "fashion-canvas", canvas, [*CAM_METHODS, "attention"], canvas_metrics,
                     "CA-Stream on the frozen GAP model above, built-in saliency: the last stage's attention"),
        "cifar_baseline": (baseline, plain, {}, [*CAM_METHODS, "attention"], ["faithfulness", "curves"],
                           "resnet18_cifar (quarter width), cross-entropy only, Fashion-MNIST at 32 px"),
        "cifar_denoised": (denoised, plain, {}, [*CAM_METHODS, "attention"], ["faithfulness", "curves"],
                           f"the same with gradient denoising (cosine, lambda {GD_WEIGHT})"),
    }
    models = {}
    for name, (model_dir, dataset, options, methods, metrics, description) in evaluated.items():
        results = evaluate_stage(out, model_dir, dataset, root, options, scale, methods, metrics)
        numbers = json.loads(results.read_text())
        models[name] = {"description": description, "results": str(results), "images": numbers["images"],
                        "recognition": numbers["recognition"],
                        "methods": {method: {k: v for k, v in values.items() if k != "seconds_per_image"}
                                    for method, values in numbers["methods"].items()},
                        **publish_and_reload(out, model_dir, results, dataset, root, options)}

    print("\n== sanity check of the GAP model's maps (model-parameter randomisation)")
    sanity = evaluate_stage(out, gap, "fashion-canvas", root, canvas, scale, SANITY_METHODS, ["sanity"])

    print("\n== figures")
    saliency_grid({"GAP: Grad-CAM": (gap, "gradcam"), "SimPool: attention": (simpool, "attention"),
                   "CA-Stream: Grad-CAM": (stream, "gradcam"), "CA-Stream: attention": (stream, "attention")},
                  "fashion-canvas", root, canvas, out / "saliency_gap_vs_castream.png",
                  "GAP, SimPool and CA-Stream on test canvases (ground-truth box in green)")
    saliency_grid({"baseline: Grad-CAM": (baseline, "gradcam"), "denoised: Grad-CAM": (denoised, "gradcam"),
                   "baseline: gradient": (baseline, "gradient"), "denoised: gradient": (denoised, "gradient")},
                  plain, root, {}, out / "saliency_baseline_vs_denoised.png",
                  "resnet18_cifar without and with gradient denoising (Fashion-MNIST test images)")
    metrics_chart(models, out / "metrics.png")
    canvases = build_dataset("fashion-canvas", root, "test", **canvas)
    chance = 100 * box_share(canvases, evaluated_indices(canvases, scale.eval_images))  # on the images evaluated
    summary = {"scale": scale_name, "settings": scale.__dict__, "machine": _machine(),
               "minutes": (time.perf_counter() - start) / 60,
               "attention_localises": localisation_bar(models["castream"]["methods"]["attention"]["SP"], chance,
                                                       models["castream"]["images"]),
               "pooling": pooling_comparison(models),
               "sanity_check": sanity_check(sanity),
               "models": models,
               "figures": ["saliency_gap_vs_castream.png", "saliency_baseline_vs_denoised.png", "metrics.png"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"summary: {out / 'summary.md'} (and summary.json, {', '.join(summary['figures'])})")


def _machine() -> str:
    device = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
