"""Opti-CAM and Score-CAM on a vision transformer beside a CNN, measured side by side in one run.

    python benchmarks/saliency_transformer_speed.py [--quick] [--device cpu|cuda] [--out results/benchmark]

Per-image time of ``explain(..., "opticam")`` and ``explain(..., "scorecam")`` on ViT-B/16 and ResNet-50 at
the thesis' default layers (``blocks[-1].norm1``, 768 channels; ``layer4[-1]``, 2048 channels), with what
explains the ratio: forward passes per image (counted), GFLOPs per forward (torch's ``FlopCounterMode``)
and their product. The thesis' T (Tables 2.1, 2.2: seconds per batch of 8 images on a GPU) is printed
beside ours, divided by 8. Every Opti-CAM image runs all its iterations (``tolerance=0``), so both models
do the same number of steps and the time is proportional to them (the default 25 keep the run short on a
CPU; the thesis' 100 take 4x as long). Each method alternates between the models for ``--rounds`` rounds
and reports the fastest round (other work on the machine only adds time; ``--threads 1`` keeps a shared
CPU from oversubscribing its threads, which slows convolutions far more than matrix products).
Random-initialised timm models (no weights can be downloaded here), crops of a photograph shipped with
matplotlib. Writes a JSON file, a Markdown table and a bar chart into ``--out``, named by the time of the run.
"""

import argparse
import time
from pathlib import Path

import timm
import torch
from measure import device_name, save_run, timed

from zoo.data.photo import photo_crops
from zoo.evaluation.figures import grid
from zoo.evaluation.saliency import default_layer, explain
from zoo.models.cost import gflops

# the thesis' T / 8: seconds per image on a GPU (Table 2.1 for ResNet-50, Table 2.2 for ViT-B)
THESIS = {("opticam", "resnet50"): 4.15 / 8, ("opticam", "vit_base_patch16_224"): 16.05 / 8,
          ("scorecam", "resnet50"): 15.22 / 8, ("scorecam", "vit_base_patch16_224"): 23.69 / 8}


def create(arch: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=size) if "vit" in arch else {}
    return timm.create_model(arch, **kwargs).eval().to(device)


def setup(arch: str, images: int, size: int, device: torch.device) -> dict:
    """A model, its images and targets, and what explains its cost: GFLOPs per forward and the channels
    of the default layer (tokens [B, N, C] or maps [B, C, h, w])."""
    model = create(arch, size, device)
    batch = photo_crops(model, images, size).to(device)
    shapes = []
    handle = default_layer(model).register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    with torch.no_grad():
        targets = model(batch).argmax(1)  # also a warm-up
    handle.remove()
    with torch.device("meta"):  # counts without computing
        flops = gflops(create(arch, size, torch.device("meta")), (3, size, size))
    return dict(arch=arch, model=model, batch=batch, targets=targets, gflops=flops,
                channels=shapes[0][-1] if len(shapes[0]) == 3 else shapes[0][1])


def explain_counted(run: dict, method: str, options: dict, device: torch.device) -> tuple[float, int]:
    """(seconds, images forwarded) of one ``explain`` call on the run's batch."""
    counted = []
    handle = run["model"].register_forward_pre_hook(lambda module, args: counted.append(len(args[0])))
    try:
        seconds, _ = timed(lambda: explain(run["model"], run["batch"], method, run["targets"], **options), device)
    finally:
        handle.remove()
    return seconds, sum(counted)


def side_by_side(method: str, models: list[str], images: int, size: int, options: dict, rounds: int,
                 device: torch.device) -> list[dict]:
    """Seconds per image of one ``explain`` call on a batch for each model, in alternating rounds (the
    fastest reported), and the forward passes per image it ran."""
    setups = [setup(arch, images, size, device) for arch in models]
    times, forwards = {arch: [] for arch in models}, {}
    for r in range(rounds):
        for run in setups if r % 2 == 0 else setups[::-1]:
            seconds, forwarded = explain_counted(run, method, options, device)
            times[run["arch"]].append(seconds / images)
            forwards[run["arch"]] = forwarded / images
    return [dict(method=method, model=run["arch"], size=size, images=images, options=options, rounds=rounds,
                 s_per_image=min(times[run["arch"]]), s_per_image_rounds=times[run["arch"]],
                 forwards_per_image=forwards[run["arch"]], gflops_per_forward=run["gflops"],
                 gflop_per_image=forwards[run["arch"]] * run["gflops"], channels=run["channels"],
                 thesis_s_per_image=THESIS.get((method, run["arch"]))) for run in setups]


def markdown(setting: str, rows: list[dict]) -> str:
    lines = [f"Ours, measured {setting}; thesis: T of Tables 2.1 / 2.2 divided by 8 (a GPU).", "",
             "| method | model | px | channels | forwards / image | GFLOPs / forward | GFLOP / image | ours s / image "
             "| ours ratio | work ratio | thesis s / image | thesis ratio |", "|---" * 12 + "|"]
    by_key = {(r["method"], r["size"], "vit" in r["model"]): r for r in rows}
    for r in rows:
        cnn = by_key[(r["method"], r["size"], False)]
        thesis = r["thesis_s_per_image"]
        thesis_ratio = thesis / cnn["thesis_s_per_image"] if thesis and cnn["thesis_s_per_image"] else None
        lines.append(
            f"| {r['method']}{_options(r['options'])} | {r['model']} | {r['size']} | {r['channels']} | "
            f"{r['forwards_per_image']:.0f} | {r['gflops_per_forward']:.2f} | {r['gflop_per_image']:.0f} | "
            f"{r['s_per_image']:.2f} | {r['s_per_image'] / cnn['s_per_image']:.2f} | "
            f"{r['gflop_per_image'] / cnn['gflop_per_image']:.2f} | "
            + (f"{thesis:.2f} | {thesis_ratio:.2f} |" if thesis_ratio else "- | - |"))
    return "\n".join(lines)


def _options(options: dict) -> str:
    return f" ({', '.join(f'{key}={value}' for key, value in options.items())})" if options else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: checks the script only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs=2, default=["vit_base_patch16_224", "resnet50"], metavar=("VIT", "CNN"))
    parser.add_argument("--opticam", nargs=3, type=int, default=[224, 2, 25], metavar=("PX", "IMAGES", "ITERATIONS"))
    parser.add_argument("--scorecam", nargs=2, type=int, default=[112, 1], metavar=("PX", "IMAGES"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per method (fastest kept)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = device_name(device)
    setting = f"on {where}, {time.strftime('%Y-%m-%d')}"
    models, (opticam_px, opticam_images, iterations), (scorecam_px, scorecam_images) = \
        args.models, args.opticam, args.scorecam
    if args.quick:
        models, opticam_px, iterations, scorecam_px = ["test_vit", "test_resnet"], 32, 2, 32
    runs = [("opticam", opticam_px, opticam_images, dict(iterations=iterations, tolerance=0)),
            ("scorecam", scorecam_px, scorecam_images, {})]
    rows = []
    for method, size, images, options in runs:
        print(f"{method} on {' and '.join(models)} at {size} px, {args.rounds} rounds ...", flush=True)
        rows += side_by_side(method, models, images, size, options, args.rounds, device)

    table = markdown(setting, rows)
    print(table)
    figure, axes = grid(1, 1, cell=(5.5, 3.6))
    ax = axes[0, 0]
    labels = [f"{method}\n{size} px" for method, size, _, _ in runs]
    for offset, arch in ((-0.2, models[0]), (0.2, models[1])):
        seconds = [r["s_per_image"] for r in rows if r["model"] == arch]
        ax.bar([i + offset for i in range(len(runs))], seconds, width=0.4, label=arch)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("seconds per image")
    ax.set_title(f"Saliency on a ViT and a CNN {setting}", fontsize=8)
    ax.legend(fontsize=7)
    save_run(args.out, "saliency_transformer_speed", dict(setting=setting, rows=rows), table, figure)


if __name__ == "__main__":
    main()
