"""Training-step throughput of the CA-Stream recipe (frozen backbone) against full fine-tuning of the same
backbone, and the throughput of the training data pipeline, measured in one run.

    python benchmarks/training_speed.py [--models resnet18_castream resnet50_castream] [--img-size 224]
                                        [--batch 16] [--rounds 7] [--workers 0 2]

A step is forward, backward and SGD update on one batch. The stream recipe's backbone has no gradient,
so autograd records nothing through it and the backward runs through the stream only; fine-tuning trains
the whole backbone with GAP (the baseline recipes). The two alternate within every round so both see the
same machine load; medians are reported. The data pipeline is the recipes' own (``build_loaders``: JPEG
decoding, random-resized crop, flip, normalisation) on JPEG files the size of an ImageNet photo written to
a temporary folder, so a loader bottleneck is not mistaken for model cost. Writes JSON and a bar chart into
``--out``, named by the time of the run.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from measure import device_name, save_run, timed
from timm.data import resolve_data_config
from tqdm import tqdm

import zoo  # noqa: F401
from zoo.data.photo import photo
from zoo.training.config import load_recipe
from zoo.training.objectives import model_logits
from zoo.training.train import build_datasets, build_loaders


def step_seconds(model, optimizer, x, labels, device) -> float:
    def step():
        F.cross_entropy(model_logits(model, x), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, device)[0]


def compare_steps(name: str, img_size: int, batch: int, rounds: int, device) -> dict:
    model = timm.create_model(name, num_classes=1000).to(device)
    stream = model.freeze_backbone().train()
    finetune = copy.deepcopy(model.backbone).requires_grad_(True).train()  # the same network with GAP
    trainable = {"stream": [p for p in stream.parameters() if p.requires_grad], "finetune": list(finetune.parameters())}
    runs = {key: (net, torch.optim.SGD(trainable[key], lr=1e-3, momentum=0.9))
            for key, net in (("stream", stream), ("finetune", finetune))}
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for net, optimizer in runs.values():  # warm-up
        step_seconds(net, optimizer, x, labels, device)
    times = {key: [] for key in runs}
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[key].append(step_seconds(*runs[key], x, labels, device))
    ratios = [f / s for s, f in zip(times["stream"], times["finetune"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return dict(model=name, trainable_stream=sum(p.numel() for p in trainable["stream"]),
                trainable_finetune=sum(p.numel() for p in trainable["finetune"]),
                stream_img_per_s=batch / statistics.median(times["stream"]),
                finetune_img_per_s=batch / statistics.median(times["finetune"]),
                speedup=quartiles[1], speedup_q1=quartiles[0], speedup_q3=quartiles[2])


def loader_throughput(workers: int, img_size: int, batch: int, count: int, root: Path) -> dict:
    recipe = load_recipe("castream_imagenet", model="resnet50_castream", weights=None, data_root=str(root),
                         workers=workers, batch_size=batch, image_size=img_size, output_dir=str(root / "run"))
    train_set, val_set, _ = build_datasets(recipe)
    with torch.device("meta"):
        config = resolve_data_config(dict(input_size=(3, img_size, img_size)), model=timm.create_model(recipe.model))
    loader, _ = build_loaders(recipe, train_set, val_set, config, batch)
    loader.dataset.set_epoch(0)
    start = time.perf_counter()
    images = sum(len(x) for x, _ in loader)
    return dict(workers=workers, img_per_s=images / (time.perf_counter() - start), images=images, files=count)


def write_photos(root: Path, count: int) -> None:
    """``count`` JPEGs of 500x375 px (ImageNet's typical size) in two class folders of train and val."""
    base = photo().resize((500, 375))
    for split in ("train", "val"):
        for index in range(count if split == "train" else 2):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            base.rotate(index % 360).save(folder / f"{index:05d}.JPEG", quality=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_castream", "resnet50_castream"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--loader-images", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = device_name(device)

    steps = [compare_steps(name, args.img_size, args.batch, args.rounds, device)
             for name in tqdm(args.models, desc="training steps")]
    with tempfile.TemporaryDirectory() as folder:
        write_photos(Path(folder), args.loader_images)
        loading = [loader_throughput(w, args.img_size, args.batch, args.loader_images, Path(folder))
                   for w in tqdm(args.workers, desc="data loading")]

    setting = f"{where}, batch {args.batch}, {args.img_size} px, median of {args.rounds} rounds"
    print(f"Training step (forward + backward + SGD), CA-Stream recipe vs fine-tuning its backbone ({setting})")
    print(f"{'model':20s} {'trainable':>20s} {'stream img/s':>13s} {'finetune img/s':>15s} {'speed-up':>9s} "
          f"{'quartiles':>12s}")
    for row in steps:
        trainable = f"{row['trainable_stream'] / 1e6:.2f}M / {row['trainable_finetune'] / 1e6:.2f}M"
        print(f"{row['model']:20s} {trainable:>20s} {row['stream_img_per_s']:13.2f} {row['finetune_img_per_s']:15.2f} "
              f"{row['speedup']:8.2f}x {row['speedup_q1']:5.2f}-{row['speedup_q3']:.2f}")
    print(f"Training data pipeline (500x375 JPEG -> random-resized crop {args.img_size} px, flip, normalise)")
    for row in loading:
        print(f"  {row['workers']} worker processes: {row['img_per_s']:.1f} images/s")

    fig = Figure(figsize=(2 + 1.6 * len(steps), 3.5))
    ax = fig.subplots()
    labels = [f"{row['model'].removesuffix('_castream')}\n{kind}" for row in steps for kind in ("stream", "finetune")]
    values = [row[f"{kind}_img_per_s"] for row in steps for kind in ("stream", "finetune")]
    ax.bar(labels, values, color=["tab:blue", "tab:gray"] * len(steps))
    for row, color in zip(loading, ["tab:green", "tab:red", "tab:purple", "tab:olive"], strict=False):
        ax.axhline(row["img_per_s"], color=color, linestyle="--", linewidth=1,
                   label=f"data pipeline, {row['workers']} workers")
    ax.set_ylabel("training images / s")
    ax.set_title(setting, fontsize=8)
    ax.legend(fontsize=7)
    save_run(args.out, "training_speed", dict(setting=setting, steps=steps, loading=loading), figure=fig)


if __name__ == "__main__":
    main()
