"""Forward throughput of each CA-Stream model against its own GAP backbone, measured side by side.

    python benchmarks/castream_throughput.py [--models ...] [--img-size 224] [--batch 8] [--rounds 15]

The GAP network is the model's own backbone (same weights, same input). The two forwards alternate
within every round, so both see the same machine load; the median of the per-round throughput ratios
is reported with its quartiles (the thesis: +0.1-0.2% FLOPs, so the goal is a ratio of at least 0.97).
Also reported: the share of the CA-Stream forward spent in the stream itself, timed alone on the same
stage features, which a noisy machine disturbs far less than the ratio. Writes a JSON file and a bar
chart of the ratios into ``--out``, named by the time of the run.
"""

import argparse
import statistics
from pathlib import Path

import timm
import torch
from matplotlib.artist import setp
from measure import device_name, save_run, timed
from tqdm import tqdm

import zoo
from zoo.evaluation.figures import grid

TARGET_RATIO = 0.97


def seconds(fn, x, device):
    return timed(lambda: fn(x), device)[0]


@torch.inference_mode()
def compare(name, img_size, batch, rounds, device):
    model = timm.create_model(name).eval().to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    runs = {"gap": model.backbone, "castream": model}
    for fn in runs.values():  # warm-up
        fn(x)
    times = {key: [] for key in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            times[key].append(seconds(runs[key], x, device))
    # the stream alone, on this batch's stage features
    features = list(model._stage_features(x))[model.stream_start:]

    def stream_only(_):
        query = model.stream.query.expand(batch, -1)
        for block, feats in zip(model.stream.blocks, features, strict=True):
            query, _ = block(query, feats)

    stream = statistics.median(seconds(stream_only, x, device) for _ in range(rounds))
    gap, castream = (statistics.median(times[key]) for key in runs)
    # per-round ratios pair runs that saw the same load; their median and quartiles show the noise
    quartiles = statistics.quantiles([g / c for g, c in zip(times["gap"], times["castream"], strict=True)], n=4)
    return dict(model=name, gap_img_per_s=batch / gap, castream_img_per_s=batch / castream,
                ratio=quartiles[1], ratio_q1=quartiles[0], ratio_q3=quartiles[2], stream_share=stream / castream)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=zoo.list_models("*_castream"))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = device_name(device)

    rows = [compare(name, args.img_size, args.batch, args.rounds, device) for name in tqdm(args.models, desc="models")]
    setting = f"{where}, batch {args.batch}, {args.img_size} px, median of {args.rounds} rounds"
    print(f"Forward throughput, CA-Stream vs its GAP backbone ({setting})")
    print(f"{'model':26s} {'GAP img/s':>10s} {'CA img/s':>10s} {'ratio':>7s} {'quartiles':>13s} {'stream share':>13s}")
    for row in rows:
        print(f"{row['model']:26s} {row['gap_img_per_s']:10.2f} {row['castream_img_per_s']:10.2f} {row['ratio']:7.3f} "
              f"{row['ratio_q1']:6.3f}-{row['ratio_q3']:.3f} {100 * row['stream_share']:12.2f}%")

    figure, axes = grid(1, 1, cell=(1 + 0.9 * len(rows), 3.5))
    ax = axes[0, 0]
    errors = [[row["ratio"] - row["ratio_q1"] for row in rows], [row["ratio_q3"] - row["ratio"] for row in rows]]
    ax.bar([row["model"].removesuffix("_castream") for row in rows], [row["ratio"] for row in rows], yerr=errors,
           capsize=3)
    ax.axhline(TARGET_RATIO, color="red", linestyle="--", label=f"goal {TARGET_RATIO}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(min(0.9, *(row["ratio_q1"] - 0.02 for row in rows)), 1.05)
    ax.set_ylabel("CA-Stream / GAP throughput")
    ax.set_title(setting, fontsize=8)
    ax.legend(fontsize=8)
    setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    save_run(args.out, "castream_throughput", dict(setting=setting, rows=rows), figure=figure)


if __name__ == "__main__":
    main()
