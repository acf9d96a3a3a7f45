"""A quick look at the zoo: every registered model's size and cost beside the thesis' figures, and a
picture of the saliency each one returns with its logits.

    python examples/quicklook.py [--models resnet50_castream ...] [--img-size 224] [--out results/quicklook]

Writes ``models.md`` / ``models.json`` (the table) and ``saliency.png`` (every stage's attention on
one photograph) into ``--out``. Models are random-initialised unless ``--pretrained`` is given (their
Hub weights must then be reachable or cached), so the maps show the mechanism, not learned evidence.
"""

import argparse
import json
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

import zoo
from zoo.data.photo import photo
from zoo.evaluation import thesis_tables
from zoo.evaluation.figures import grid, overlay, pixels, save, show
from zoo.evaluation.saliency import normalise_per_image
from zoo.models.cost import gflops, parameter_count


def measure(name: str, img_size: int) -> dict:
    """Parameters and GFLOPs of the model and of its GAP backbone, counted on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name)
    input_size = (3, img_size, img_size)
    row = dict(
        model=name,
        params_m=parameter_count(model) / 1e6,
        gap_params_m=parameter_count(model.backbone) / 1e6,
        stream_params_m=parameter_count(model.stream) / 1e6,
        gap_gflops=gflops(model.backbone, input_size),
        gflops=gflops(model, input_size),
        img_size=img_size,
    )
    if img_size == 224 and name in thesis_tables.TABLE_3_3:  # the thesis measured at 224 px
        row["thesis"] = thesis_tables.TABLE_3_3[name]
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | params (M) | stream (M) | thesis params (M) | GFLOPs GAP -> CA-Stream | thesis GFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = row.get("thesis")
        paper_params = f"{paper['params_m']:.2f}" if paper else "-"
        paper_gflops = f"{paper['gap_gflops']:.3f} -> {paper['gflops']:.3f}" if paper else "-"
        lines.append(
            f"| {row['model']} | {row['params_m']:.2f} | {row['stream_params_m']:.3f} | {paper_params} | "
            f"{row['gap_gflops']:.3f} -> {row['gflops']:.3f} (+{row['gflops'] - row['gap_gflops']:.4f}) | "
            f"{paper_gflops} |"
        )
    return "\n".join(lines)


@torch.no_grad()
def stage_attentions(name: str, image: Image.Image, img_size: int, pretrained: bool):
    """The preprocessed image (for display, in [0, 1]) and each tapped stage's index and attention."""
    model = timm.create_model(name, pretrained=pretrained).eval()
    config = resolve_data_config(dict(input_size=(3, img_size, img_size)), model=model)
    x = create_transform(**config)(image).unsqueeze(0)
    attentions = model.forward_stream(x).attentions
    return pixels(x, config)[0], dict(enumerate(attentions, start=model.stream_start))


def saliency_figure(names: list[str], img_size: int, pretrained: bool, path: Path) -> None:
    """One row per model: the image, then each stage's attention overlaid, columns aligned by stride."""
    image = photo()
    results = {name: stage_attentions(name, image, img_size, pretrained) for name in tqdm(names, desc="saliency")}
    columns = 1 + max(len(maps) for _, maps in results.values())
    figure, axes = grid(len(names), columns, cell=(2.2, 2.3))
    for row, (name, (shown, maps)) in zip(axes, results.items(), strict=True):
        show(row[0], shown)
        row[0].set_title(name, fontsize=8, loc="left")
        for ax in row:
            ax.axis("off")
        for ax, (stage, attention) in zip(row[columns - len(maps):], maps.items(), strict=True):
            overlay(ax, shown, normalise_per_image(attention, shown.shape[:2])[0])
            ax.set_title(f"stage {stage}, {attention.shape[-2]}x{attention.shape[-1]}", fontsize=8)
    weights = "pretrained weights" if pretrained else "random initialisation: the mechanism, not learned evidence"
    figure.suptitle(f"CA-Stream built-in saliency: each stage's attention, own colour scale ({weights})", fontsize=10)
    save(figure, path, dpi=110, rect=(0, 0, 1, 0.97))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="registered CA-Stream names (default: all)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("results/quicklook"))
    parser.add_argument("--pretrained", action="store_true", help="load Hub weights instead of random init")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    names = args.models or zoo.list_models("*_castream")
    unknown = sorted(set(names) - set(zoo.list_models("*_castream")))
    if unknown:
        parser.error(f"not CA-Stream models: {', '.join(unknown)} (known: {', '.join(zoo.list_models('*_castream'))})")
    outputs = [args.out / name for name in ("models.md", "models.json", "saliency.png")]
    if any(path.exists() for path in outputs):
        print(f"replacing the previous quick look in {args.out} (it is reproducible: fixed seed)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    rows = [measure(name, args.img_size) for name in tqdm(names, desc="size and cost")]
    table = markdown_table(rows)
    note = (f"Ours: measured at {args.img_size} px, FLOPs by torch's FlopCounterMode (2 per multiply-accumulate, "
            "convolutions and matrix products only). Thesis: Table 3.3 of the thesis, ImageNet-1k, 224 px.")
    outputs[0].write_text(f"{table}\n\n{note}\n")
    outputs[1].write_text(json.dumps(rows, indent=2))
    saliency_figure(names, args.img_size, args.pretrained, outputs[2])
    print(f"{table}\n\n{note}\n")
    print(f"wrote {', '.join(map(str, outputs))}")


if __name__ == "__main__":
    main()
