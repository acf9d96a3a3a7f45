"""Adebayo et al.'s model-parameter randomisation sanity check (NeurIPS 2018, "Sanity Checks for Saliency Maps",
§3.1 and Figure 2) on a trained network: by default the demo's GAP ResNet-18 on Fashion-MNIST canvases, which
``make demo`` trains into ``results/demo/runs/gap`` (this script trains nothing).

    python experiments/sanity_check.py [--demo results/demo | --model-dir FOLDER] [--images 32]
        [--methods gradcam guided_backprop gradient] [--preset blocks] [--seed 42] [--data FOLDER]
        [--out results/sanity]

The model's layers are re-initialised from the classifier down to the stem, block by block (``--preset``; cascading,
and independently), as ``zoo.evaluation.metrics.sanity`` does for ``zoo-eval --metrics sanity``. Each method's maps
of ``--images`` test images (those a ``zoo-eval --limit`` run evaluates; the class explained is the label) on each
randomised model are compared with its maps on the trained model by Spearman's rank correlation and SSIM. The images
come from the dataset the model was trained on, as its run's ``recipe.json`` beside the model folder records it;
``--data`` reads Fashion-MNIST from another folder. Expected (Adebayo et al.): Grad-CAM's maps decorrelate as the
layers are randomised, guided backpropagation's stay alike.

Writes into ``--out``: ``sanity.json`` (the steps; per method the harness' MPRT, MPRT-SSIM, IMPRT, IMPRT-SSIM and
eMPRT, and per step the mean and standard deviation over the images of both similarities, cascading and
independent), ``sanity.md`` and ``sanity.png`` (the cascading similarity curves, and each method's maps of the first
``--examples`` images across the cascading steps).
"""

import argparse
import json
from pathlib import Path

import timm
import torch
from matplotlib.figure import Figure

import zoo  # noqa: F401  (registers the zoo's models with timm)
from zoo.data import build_dataset, dataset_images, find_fashion_mnist
from zoo.evaluation.figures import pixels, save
from zoo.evaluation.harness import evaluated_indices
from zoo.evaluation.metrics.sanity import (
    HARNESS_PRESET,
    MEASURES,
    ORDERS,
    PRESETS,
    SANITY_SEED,
    model_randomisation,
    randomisation_steps,
    randomised_models,
)
from zoo.evaluation.saliency import explain
from zoo.hub import read_config
from zoo.metrics import reported_value, tables

METHODS = ["gradcam", "guided_backprop", "gradient"]


def model_folder(demo: Path, model_dir: Path | None) -> Path:
    """The model to check: ``model_dir``, or the demo's GAP model in ``demo``."""
    folder = model_dir or demo / "runs" / "gap" / "model"
    if not (folder / "config.json").is_file():
        hint = "pass the model/ folder of a training run" if model_dir else \
            "run `make demo` first (it trains the GAP ResNet-18 into results/demo/runs/gap), or pass --model-dir"
        raise SystemExit(f"{folder} holds no model: {hint}")
    return folder


def checked_images(model_dir: Path, count: int, data: Path | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``count`` test images of the dataset the model was trained on (its run's ``recipe.json``), preprocessed as
    its config says, their labels, and a description of the data."""
    path = model_dir.parent / "recipe.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the model folder must be the model/ folder of a training run, whose "
                         "recipe.json names the data it was trained on")
    recipe = json.loads(path.read_text())
    name, root, options = recipe["dataset"], recipe["data_root"], dict(recipe["dataset_options"])
    if data is not None:
        files = find_fashion_mnist(data)
        root, options["source"] = files.root, files.source
    indices = evaluated_indices(build_dataset(name, root, "test", **options), count)
    images, targets = dataset_images(name, root, read_config(model_dir)["pretrained_cfg"], indices, **options)
    labels = torch.stack([torch.as_tensor(target["label"]) for target in targets])
    if labels.ndim != 1:
        raise SystemExit(f"{name} is multi-label: the check explains one class per image")
    return images, labels, {"dataset": name, "split": "test", "options": options, "indices": indices}


def summary(values: torch.Tensor) -> dict[str, list[float]]:
    """Mean and standard deviation over the images [N, S] of each step."""
    return {"mean": values.mean(0).tolist(), "std": values.std(0, correction=0).tolist()}


def check_method(model, images: torch.Tensor, labels: torch.Tensor, method: str, preset: str, seed: int) -> dict:
    """One method's randomisation test: the harness' metrics and the per-step similarities."""
    maps = explain(model, images, method, labels)
    result = model_randomisation(model, images, method, labels, maps, preset=preset, seed=seed, progress=True)
    inputs = {"maps": maps, "sanity": result}
    metrics = {}
    for metric in tables()["sanity"]:
        values = metric.values(inputs)
        included = ~values.isnan()
        metrics[metric.key] = reported_value(metric, values, included) if included.any() else None
    return {"metrics": metrics,
            **{order: {measure: summary(getattr(result, order)[..., i]) for i, measure in enumerate(MEASURES)}
               for order in ORDERS}}


def example_maps(model, images: torch.Tensor, labels: torch.Tensor, method: str, steps, seed: int) -> torch.Tensor:
    """The method's maps [1 + S, n, H, W] of a few images on the trained model and after each cascading step."""
    maps = [explain(model, images, method, labels)]
    maps += [explain(randomised, images, method, labels) for _, randomised in randomised_models(model, steps, seed)]
    return torch.stack(maps)


def markdown(results: dict) -> str:
    methods, steps = results["methods"], results["steps"]
    keys = list(next(iter(methods.values()))["metrics"])
    lines = [f"# Model-parameter randomisation of `{results['model']}`", "",
             f"{results['images']} test images of {results['data']['dataset']}; preset `{results['preset']}` "
             f"({len(steps)} steps, top-down), seed {results['seed']}. Similarity of each map with the map on the "
             "trained model: lower means the map changed (passes).", "",
             "| method | " + " | ".join(f"{key}{'↑' if key == 'eMPRT' else '↓'}" for key in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join("-" if entry["metrics"][key] is None else f"{entry['metrics'][key]:.3f}"
                                            for key in keys) + " |" for method, entry in methods.items()]
    lines += ["", "Cascading randomisation, Spearman's rank correlation (mean ± std over the images), after each step:",
              "", "| randomised down to | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s, step in enumerate(steps):
        cells = [f"{entry['cascading']['spearman']['mean'][s]:.3f} ± {entry['cascading']['spearman']['std'][s]:.3f}"
                 for entry in methods.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    if {"gradcam", "guided_backprop"} <= methods.keys():
        gradcam, guided = (methods[name]["metrics"]["MPRT"] for name in ("gradcam", "guided_backprop"))
        verdict = "change more" if gradcam < guided else "do NOT change more"
        lines += ["", f"Grad-CAM's maps {verdict} than guided backpropagation's as the layers are randomised "
                      f"(MPRT {gradcam:.3f} vs {guided:.3f}; Adebayo et al. found guided backpropagation's unchanged)."]
    return "\n".join(lines) + "\n"


def figure(results: dict, examples: dict[str, torch.Tensor], shown: torch.Tensor, path: Path) -> Path:
    """Top: each method's mean cascading similarity after each step (Adebayo et al.'s Figure 2, bottom); below, its
    maps of the example images across the steps."""
    steps, methods = results["steps"], list(results["methods"])
    columns, rows = len(steps) + 2, len(methods) * len(shown)
    fig = Figure(figsize=(1.15 * columns, 3.2 + 1.2 * rows))
    layout = fig.add_gridspec(rows + 2, columns, height_ratios=[1.4, 1.4] + [1] * rows)
    x = list(range(len(steps) + 1))
    for panel, measure in enumerate(MEASURES):
        ax = fig.add_subplot(layout[:2, panel * columns // 2:(panel + 1) * columns // 2])
        for method in methods:
            mean = [1.0, *results["methods"][method]["cascading"][measure]["mean"]]
            ax.plot(x, mean, marker="o", markersize=3, label=method)
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xticks(x, ["original", *steps], rotation=60, fontsize=6, ha="right")
        ax.set_ylabel("Spearman rank correlation" if measure == "spearman" else "SSIM", fontsize=8)
        ax.set_title(f"cascading randomisation, top-down: {measure}", fontsize=9)
        ax.legend(fontsize=7)
    for m, method in enumerate(methods):
        for i, image in enumerate(shown):
            row = 2 + m * len(shown) + i
            for column, cell in enumerate([image.squeeze(-1), *examples[method][:, i]]):
                ax = fig.add_subplot(layout[row, column])
                ax.imshow(cell.numpy(), cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 2:
                    ax.set_title(["image", "original", *steps][column], fontsize=6)
                if column == 0:
                    ax.set_ylabel(method, fontsize=7)
    return save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("results/demo"), help="the demo's output folder")
    parser.add_argument("--model-dir", type=Path, help="a training run's model/ folder instead of the demo's GAP model")
    parser.add_argument("--images", type=int, default=32, help="test images checked")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--preset", choices=list(PRESETS), default=HARNESS_PRESET)
    parser.add_argument("--seed", type=int, default=SANITY_SEED)
    parser.add_argument("--examples", type=int, default=2, help="images whose maps the figure shows")
    parser.add_argument("--data", type=Path, help="a folder of Fashion-MNIST idx files (default: the run's data)")
    parser.add_argument("--out", type=Path, default=Path("results/sanity"))
    args = parser.parse_args(argv)
    model_dir = model_folder(args.demo, args.model_dir)
    images, labels, data = checked_images(model_dir, args.images, args.data)
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    steps = randomisation_steps(model, images, args.preset)
    print(f"{model_dir}: {len(steps)} steps ({args.preset}), top-down: {', '.join(step.name for step in steps)}")
    results = {"model": str(model_dir), "images": len(images), "data": data, "preset": args.preset, "seed": args.seed,
               "steps": [step.name for step in steps], "methods": {}}
    examples = {}
    for method in args.methods:
        print(f"== {method}")
        results["methods"][method] = check_method(model, images, labels, method, args.preset, args.seed)
        examples[method] = example_maps(model, images[:args.examples], labels[:args.examples], method, steps,
                                        args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sanity.json").write_text(json.dumps(results, indent=2))
    (args.out / "sanity.md").write_text(markdown(results))
    shown = pixels(images[:args.examples], read_config(model_dir)["pretrained_cfg"])
    figure(results, examples, shown, args.out / "sanity.png")
    print(markdown(results))
    print(f"wrote {args.out}/sanity.json, sanity.md and sanity.png")


if __name__ == "__main__":
    main()
