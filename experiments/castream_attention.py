"""Where a CA-Stream's attention goes on the demo's canvases, and why: streams trained at several learning
rates on one frozen GAP model (the demo's), every stage's attention scored with the pointing game.

    python experiments/castream_attention.py [--gap results/demo/runs/gap/model] [--lrs 0.1 0.01 0.003 0.001]
        [--images 300] [--data FOLDER] [--out results/castream_attention]

Each stream is trained with the recipe the demo (``make demo``) trained its own stream with: the ``recipe.json`` of
the demo's run ``castream``, beside the run of the GAP model ``--gap`` (``runs/gap/model``). Only the lr differs;
the run's name and folder become ``--out/runs/lr<lr>`` (a finished run is reused), the GAP model's path is
``--gap`` as given here and, with ``--data``, the Fashion-MNIST files are read from there. So the streams see the
demo's data, scale (``--quick`` or not), seed and every other setting. Then, on ``--images`` test canvases of
that recipe (those a ``zoo-eval --limit`` run of as many images evaluates, as the demo's evaluation does):

- every stage's attention: standard pointing game (eq. 1.21, the map upsampled to the canvas), normalised
  entropy (1 = uniform) and mean maximum, beside the validation top-1 of the run's last epoch;
- a probe of what the frozen classifier reads: its top-1 on the GAP model's last feature map pooled over all
  positions (GAP), over the positions whose centre lies in the object's box, and over the others.

Writes ``results.json``, ``results.md`` and ``attention_by_lr.png`` into ``--out``.
"""

import argparse
import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import timm
import torch

import zoo  # noqa: F401  (registers the zoo's models with timm)
from zoo.data import box_share, build_dataset, dataset_images, find_fashion_mnist
from zoo.evaluation.figures import grid, save
from zoo.evaluation.harness import evaluated_indices
from zoo.evaluation.metrics import pointing_game
from zoo.evaluation.saliency import normalise_per_image
from zoo.hub import read_config
from zoo.metrics import METRICS, reported_value
from zoo.training.config import Recipe
from zoo.training.run_folder import finished_model
from zoo.training.train import train

DEMO_STREAM_RUN = "castream"  # the demo's run of its stream, in the same runs/ folder as its GAP model's run


def demo_stream_recipe(gap: Path) -> Recipe:
    """The recipe of the demo's stream run beside the run of the GAP model folder ``gap``."""
    path = gap.parent.parent / DEMO_STREAM_RUN / "recipe.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --gap must be the model of a demo's GAP run (runs/gap/model), whose "
                         f"stream run runs/{DEMO_STREAM_RUN} holds the recipe the streams are trained with")
    return Recipe(**json.loads(path.read_text()))


def trained(recipe: Recipe) -> Path:
    """The model folder of ``recipe``'s run, trained unless the run finished already."""
    return finished_model(recipe) or train(recipe)


def scored_canvases(model_dir: Path, root: str, options: dict, indices: list[int]):
    """The test canvases ``indices`` preprocessed for the model, their boxes [count, 4] and labels."""
    images, targets = dataset_images("fashion-canvas", root, read_config(model_dir)["pretrained_cfg"], indices,
                                     **options)
    return images, torch.stack([t["boxes"][0] for t in targets]), torch.tensor([t["label"] for t in targets])


def attention_by_stage(model_dir: Path, images: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
    """Pointing game, normalised entropy and mean maximum of each stage's attention."""
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    with torch.no_grad():
        attentions = model.forward_stream(images).attentions
    rows = []
    for stage, attention in enumerate(attentions):
        flat = attention.flatten(1)
        entropy = -(flat * flat.clamp_min(1e-12).log()).sum(1) / math.log(flat.shape[1])
        maps = normalise_per_image(attention, images.shape[-2:])
        rows.append({"stage": stage, "grid": list(attention.shape[-2:]),
                     "SP": reported_value(METRICS["SP"], pointing_game(maps, list(boxes[:, None]))),
                     "entropy": entropy.mean().item(), "max": flat.amax(1).mean().item()})
    return rows


def classifier_probe(gap_dir: Path, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 (%) of the GAP model's frozen classifier on its last features pooled over all positions, over the
    positions inside the box and over those outside it, and the mean norm of a position's features there."""
    model = timm.create_model(f"local-dir:{gap_dir}", pretrained=True).eval()
    with torch.no_grad():
        features = model.forward_features(images)
        (height, width), size = features.shape[-2:], images.shape[-1]
        ys, xs = ((torch.arange(n) + 0.5) * size / n for n in (height, width))
        inside = ((ys[None, :, None] >= boxes[:, 1, None, None]) & (ys[None, :, None] < boxes[:, 3, None, None])
                  & (xs[None, None] >= boxes[:, 0, None, None]) & (xs[None, None] < boxes[:, 2, None, None]))
        norms = features.norm(dim=1)
        probe = {}
        for name, where in (("all positions (GAP)", torch.ones_like(inside)), ("inside the box", inside),
                            ("outside the box", ~inside)):
            weights = where[:, None].float()
            pooled = (features * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1)
            probe[name] = {"top1": 100 * (model.get_classifier()(pooled).argmax(1) == labels).float().mean().item(),
                           "feature_norm": norms[where].mean().item()}
    return probe


def last_validation(model_dir: Path) -> float:
    with open(model_dir.parent / "metrics.csv") as rows:
        return float(list(csv.DictReader(rows))[-1]["val_top1"])


def markdown(results: dict) -> str:
    lines = [f"Streams on the frozen GAP model `{results['gap']}`, {results['images']} test canvases; pointing-game "
             f"chance level {results['chance']:.2f} %.", "",
             "| stream lr | val top-1 | " + " | ".join(f"SP stage {r['stage']} ({r['grid'][0]}x{r['grid'][1]})"
                                                      for r in results["runs"][0]["stages"])
             + " | last stage: entropy / max |", "|---" * (len(results["runs"][0]["stages"]) + 3) + "|"]
    for run in results["runs"]:
        last = run["stages"][-1]
        lines.append(f"| {run['lr']:g} | {run['val_top1']:.2f} | " + " | ".join(f"{r['SP']:.1f}" for r in run["stages"])
                     + f" | {last['entropy']:.3f} / {last['max']:.3f} |")
    lines += ["", "| the GAP model's last features, pooled over | top-1 of its frozen classifier "
                  "| mean norm at a position |", "|---|---|---|"]
    lines += [f"| {name} | {probe['top1']:.2f} | {probe['feature_norm']:.2f} |"
              for name, probe in results["probe"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap", type=Path, default=Path("results/demo/runs/gap/model"),
                        help="the GAP model folder the demo trained")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.01, 0.003, 0.001])
    parser.add_argument("--images", type=int, default=300, help="test canvases scored")
    parser.add_argument("--data", type=Path,
                        help="a folder of Fashion-MNIST idx files (default: the files the demo's runs read)")
    parser.add_argument("--out", type=Path, default=Path("results/castream_attention"))
    args = parser.parse_args(argv)
    if not (args.gap / "config.json").exists():
        raise SystemExit(f"{args.gap} holds no model: run `make demo` first or pass --gap")
    demo = demo_stream_recipe(args.gap)
    if args.data is not None:
        files = find_fashion_mnist(args.data)
        demo = replace(demo, data_root=files.root, dataset_options={**demo.dataset_options, "source": files.source})
    canvases = build_dataset("fashion-canvas", demo.data_root, "test", **demo.dataset_options)
    scored = evaluated_indices(canvases, args.images)
    images, boxes, labels = scored_canvases(args.gap, demo.data_root, demo.dataset_options, scored)
    runs = []
    for lr in args.lrs:
        name = f"lr{lr:g}"
        model_dir = trained(replace(demo, name=name, output_dir=str(args.out / "runs" / name), lr=lr,
                                    weights=str(args.gap)))
        runs.append({"lr": lr, "val_top1": last_validation(model_dir),
                     "stages": attention_by_stage(model_dir, images, boxes)})
    results = {"gap": str(args.gap), "images": args.images, "runs": runs,
               "chance": 100 * box_share(canvases, scored),
               "probe": classifier_probe(args.gap, images, boxes, labels)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    figure, axes = grid(1, 1, cell=(6, 3.6))
    ax = axes[0, 0]
    for stage in range(len(runs[0]["stages"])):
        ax.plot([r["lr"] for r in runs], [r["stages"][stage]["SP"] for r in runs], marker="o", label=f"stage {stage}")
    ax.axhline(results["chance"], color="gray", linestyle="--", label="chance")
    ax.set(xscale="log", xlabel="stream learning rate", ylabel="pointing game (%)",
           title="CA-Stream attention on the demo's canvases")
    ax.legend(fontsize=7)
    save(figure, args.out / "attention_by_lr.png", dpi=110)
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md and attention_by_lr.png")


if __name__ == "__main__":
    main()
