"""Training throughput of the CA-Stream recipe at ImageNet scale, and whether its data pipeline keeps up, in one run.

    python benchmarks/training_speed.py [--models resnet18_castream resnet50_castream] [--img-size 224]
        [--batches B ...] [--rounds 5] [--workers W ...] [--images N] [--data DIR] [--device cuda|cpu] [--quick]

1. Steps on pre-loaded tensors, per model and batch size: a step (forward, backward, SGD update) of the stream
   recipe against full fine-tuning of the same backbone with GAP (the baseline recipes). The stream recipe's
   backbone has no gradient, so autograd records nothing through it and the backward runs through the stream only.
   The two alternate within every round so both see the same machine load; medians are reported.
2. The recipes' data pipeline alone (``build_loaders``: random-resized crop, flip, normalisation), per decoding
   path and number of DataLoader workers: "workers" decodes and augments in the worker processes (the CPU path);
   "device" has the workers read the files and draw each sample's crop and flip, and decodes (nvJPEG on a GPU) and
   augments on the device (``zoo.data.device``). Images/s delivered on the device, ``.to(device)`` included.
3. The stream recipe fed by each pipeline, per model, at the largest batch with the most workers: images/s of the
   steps over one pass of the folder, beside the same loop over pre-loaded batches run just before, their ratio
   (1: the loader costs nothing), and the projected time of one ImageNet epoch (1,281,167 images) and of the
   recipe's 90 epochs on this device (training steps only, validation not counted).

The images are photographs: an ImageNet-style train split of ``--images`` JPEGs of 500x375 px over 1000 classes
(random crops and flips of matplotlib's sample photographs), written into a temporary folder, or ``--data DIR`` to
keep it; a pass lists them as many times as it takes to outlast the workers' read-ahead 4 times (``recipe_loader``).
Defaults: on a GPU batches 64, 128 and 256, 4 and 8 workers, 2048 photographs; on a CPU batch 16, 0 and 2 workers,
256 photographs. ``--quick`` checks the script on a CPU at toy sizes. Writes JSON, a Markdown table and a bar
chart into ``--out``, named by the time of the run.
"""

import argparse
import copy
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from measure import device_name, save_run, timed, write_photos
from timm.data import resolve_data_config
from tqdm import tqdm

import zoo  # noqa: F401
from zoo.training.config import load_recipe
from zoo.training.objectives import model_logits
from zoo.training.train import build_datasets, build_loaders

IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training split, the projection's target
RECIPE_EPOCHS = load_recipe("castream_imagenet").epochs
PHOTO_SIZE = (500, 375)  # width, height: ImageNet's most common
PREFETCHES, MIN_BATCHES = 4, 20  # a timed pass: at least 4 times the workers' read-ahead, and 20 batches
DECODERS = ("workers", "device")
DEFAULTS = {"cuda": dict(batches=[64, 128, 256], workers=[4, 8], images=2048),
            "cpu": dict(batches=[16], workers=[0, 2], images=256)}
QUICK = dict(models=["resnet18_castream"], img_size=32, batches=[2], workers=[0], images=8, rounds=3,
             photo_size=(80, 60))  # the 8 photographs listed 6 times: 24 batches of 2


def sgd_step(model, optimizer, x, labels) -> None:
    F.cross_entropy(model_logits(model, x), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stream_and_finetune(name: str, device: torch.device) -> dict:
    """The stream recipe's model (backbone frozen) and its backbone with GAP, all trainable, each with its SGD."""
    model = timm.create_model(name, num_classes=1000).to(device)
    stream = model.freeze_backbone().train()
    finetune = copy.deepcopy(model.backbone).requires_grad_(True).train()
    trainable = {"stream": [p for p in stream.parameters() if p.requires_grad], "finetune": list(finetune.parameters())}
    return {key: (net, torch.optim.SGD(trainable[key], lr=1e-3, momentum=0.9))
            for key, net in (("stream", stream), ("finetune", finetune))}


def compare_steps(name: str, img_size: int, batch: int, rounds: int, device: torch.device) -> dict:
    runs = stream_and_finetune(name, device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for net, optimizer in runs.values():  # warm-up
        sgd_step(net, optimizer, x, labels)
    times = {key: [] for key in runs}
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[key].append(timed(lambda key=key: sgd_step(*runs[key], x, labels), device)[0])
    ratios = [f / s for s, f in zip(times["stream"], times["finetune"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    counts = {key: sum(p.numel() for p in optimizer.param_groups[0]["params"]) for key, (_, optimizer) in runs.items()}
    return dict(model=name, batch=batch, trainable_stream=counts["stream"], trainable_finetune=counts["finetune"],
                stream_img_per_s=batch / statistics.median(times["stream"]),
                finetune_img_per_s=batch / statistics.median(times["finetune"]),
                speedup=quartiles[1], speedup_q1=quartiles[0], speedup_q3=quartiles[2])


def recipe_loader(root: Path, model: str, decode: str, workers: int, batch: int, img_size: int,
                  device: torch.device):
    """The castream_imagenet recipe's training loader over ``root``, decoding where ``decode`` says. The folder's
    files are listed as many times as it takes for a pass to last ``PREFETCHES`` times what the workers load
    ahead (2 batches each), and at least ``MIN_BATCHES`` batches: else the timing would mostly see batches loaded
    before it started."""
    recipe = load_recipe("castream_imagenet", model=model, weights=None, data_root=str(root), workers=workers,
                         batch_size=batch, image_size=img_size, decode=decode, val_split="train",
                         output_dir=str(root / "run"))
    train_set, val_set, _ = build_datasets(recipe)
    batches = max(MIN_BATCHES, PREFETCHES * 2 * workers) + 1
    repeats = -(-batches * batch // len(train_set))
    train_set.source.samples, train_set.source.targets = [train_set.source.samples * repeats,
                                                          train_set.source.targets * repeats]
    with torch.device("meta"):
        config = resolve_data_config(dict(input_size=(3, img_size, img_size)), model=timm.create_model(model))
    loader, _ = build_loaders(recipe, train_set, val_set, config, batch, device)
    loader.dataset.set_epoch(0)
    return loader


def timed_pass(loader, device: torch.device, step=None) -> tuple[int, float]:
    """(images, seconds) of one pass over ``loader``, each batch moved to ``device`` (and given to ``step``),
    timed from the first batch's arrival: the workers' start is not counted."""
    images, start = 0, None
    for batch, target in loader:
        x = batch.to(device, non_blocking=True)
        if step is not None:
            step(x, target["label"].to(device, non_blocking=True))
        if start is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        else:
            images += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def loader_throughput(root: Path, model: str, decode: str, workers: int, batch: int, img_size: int,
                      device: torch.device) -> dict:
    loader = recipe_loader(root, model, decode, workers, batch, img_size, device)
    images, seconds = timed_pass(loader, device)
    return dict(decode=decode, workers=workers, batch=batch, images=images, img_per_s=images / seconds)


def fed_steps(name: str, root: Path, decode: str, workers: int, batch: int, img_size: int,
              device: torch.device) -> dict:
    """Stream-recipe steps over one pass of the loader, and the same number over one pre-loaded batch, before and
    after it."""
    net, optimizer = stream_and_finetune(name, device)["stream"]
    loader = recipe_loader(root, name, decode, workers, batch, img_size, device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    sgd_step(net, optimizer, x, labels)  # warm-up
    steps = len(loader) - 1  # as many as the timed part of the pass

    def preloaded_seconds() -> float:
        return timed(lambda: [sgd_step(net, optimizer, x, labels) for _ in range(steps)], device)[0]

    before = preloaded_seconds()
    images, seconds = timed_pass(loader, device, lambda x, labels: sgd_step(net, optimizer, x, labels))
    preloaded = (before + preloaded_seconds()) / 2  # before and after the pass: the same machine load on average
    fed = images / seconds
    return dict(model=name, decode=decode, workers=workers, batch=batch, images=images, img_per_s=fed,
                preloaded_img_per_s=steps * batch / preloaded, ratio=fed * preloaded / (steps * batch),
                epoch_hours=IMAGENET_TRAIN / fed / 3600, recipe_hours=RECIPE_EPOCHS * IMAGENET_TRAIN / fed / 3600)


def markdown(setting: str, photo_size: tuple[int, int], steps: list[dict], loading: list[dict],
             fed: list[dict]) -> str:
    lines = [f"Training steps on pre-loaded tensors ({setting})", "",
             "| model | batch | trainable, stream / fine-tuning | stream img/s | fine-tuning img/s | speed-up "
             "(quartiles) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['trainable_stream'] / 1e6:.2f}M / "
              f"{r['trainable_finetune'] / 1e6:.2f}M | {r['stream_img_per_s']:.1f} | {r['finetune_img_per_s']:.1f} | "
              f"{r['speedup']:.2f}x ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}) |" for r in steps]
    lines += ["", f"The data pipeline alone ({photo_size[0]}x{photo_size[1]} JPEGs -> random-resized crop, flip, "
              "normalise, on the device)", "",
              "| decoded in | workers | batch | img/s |", "|---|---|---|---|"]
    lines += [f"| {r['decode']} | {r['workers']} | {r['batch']} | {r['img_per_s']:.1f} |" for r in loading]
    lines += ["", f"The stream recipe fed by the pipeline (projected to ImageNet-1k's {IMAGENET_TRAIN:,} training "
              f"images, {RECIPE_EPOCHS} epochs, training steps only)", "",
              "| model | decoded in | workers | batch | fed img/s | pre-loaded img/s | fed / pre-loaded | 1 epoch h | "
              f"{RECIPE_EPOCHS} epochs h |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['decode']} | {r['workers']} | {r['batch']} | {r['img_per_s']:.1f} | "
              f"{r['preloaded_img_per_s']:.1f} | {r['ratio']:.3f} | {r['epoch_hours']:.2f} | {r['recipe_hours']:.1f} |"
              for r in fed]
    return "\n".join(lines)


def figure(setting: str, steps: list[dict], loading: list[dict], fed: list[dict]) -> Figure:
    fig = Figure(figsize=(4 + 1.2 * len(steps) + 0.8 * len(fed), 4))
    left, right = fig.subplots(1, 2, width_ratios=[len(steps) * 2, max(len(fed), 1) * 2])
    labels = [f"{r['model'].removesuffix('_castream')}\nbatch {r['batch']}\n{kind}" for r in steps
              for kind in ("stream", "finetune")]
    left.bar(labels, [r[f"{kind}_img_per_s"] for r in steps for kind in ("stream", "finetune")],
             color=["tab:blue", "tab:gray"] * len(steps))
    for row, color in zip(loading, ["tab:green", "tab:olive", "tab:red", "tab:purple"] * len(loading), strict=False):
        left.axhline(row["img_per_s"], color=color, linestyle="--", linewidth=1,
                     label=f"pipeline decoding in {row['decode']}, {row['workers']} workers")
    left.set_yscale("log")
    left.set_ylabel("training images / s")
    left.set_title("steps on pre-loaded tensors", fontsize=8)
    left.legend(fontsize=6)
    left.tick_params(axis="x", labelsize=6)
    names = [f"{r['model'].removesuffix('_castream')}\n{r['decode']}" for r in fed]
    right.bar(names, [r["ratio"] for r in fed], color="tab:blue")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylabel("fed / pre-loaded step rate")
    right.set_title("stream recipe fed by the pipeline", fontsize=8)
    right.tick_params(axis="x", labelsize=6)
    fig.suptitle(setting, fontsize=8)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_castream", "resnet50_castream"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 64 128 256 on a GPU, 16 on a "
                                                               "CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader workers (default: 4 8 on a GPU, 0 2 on a "
                                                               "CPU)")
    parser.add_argument("--images", type=int, help="JPEGs in the folder (default: 2048 on a GPU, 256 on a CPU)")
    parser.add_argument("--data", type=Path, help="the folder of photographs, kept (default: a temporary one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes on a CPU, to check the script")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        for key in ("models", "img_size", "batches", "workers", "images", "rounds"):
            setattr(args, key, QUICK[key])
    device = torch.device(args.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch, workers = max(args.batches), max(args.workers)
    setting = f"{device_name(device)}, {args.img_size} px"

    steps = [compare_steps(name, args.img_size, size, args.rounds, device)
             for name in tqdm(args.models, desc="training steps") for size in args.batches]
    photo_size = QUICK["photo_size"] if args.quick else PHOTO_SIZE
    with nullcontext(args.data) if args.data else tempfile.TemporaryDirectory(prefix="photos-") as folder:
        root = Path(folder)
        write_photos(root, "train", args.images, photo_size)
        loading = [loader_throughput(root, args.models[0], decode, count, batch, args.img_size, device)
                   for decode in tqdm(DECODERS, desc="data pipeline") for count in args.workers]
        fed = [fed_steps(name, root, decode, workers, batch, args.img_size, device)
               for name in tqdm(args.models, desc="fed steps") for decode in DECODERS]

    table = markdown(setting, photo_size, steps, loading, fed)
    print(table)
    save_run(args.out, "training_speed", dict(setting=setting, steps=steps, loading=loading, fed=fed), table=table,
             figure=figure(setting, steps, loading, fed))


if __name__ == "__main__":
    main()
