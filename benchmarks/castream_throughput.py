"""Forward throughput of each CA-Stream model against its own GAP backbone, measured side by side.

    python benchmarks/castream_throughput.py [--models ...] [--img-size 224] [--batches 8 64 256]
        [--modes eager compile reduce-overhead] [--rounds 15] [--quick]

The GAP network is the model's own backbone (same weights, same input). For every batch size and mode the two
forwards alternate within every round, so both see the same machine load; the median of the per-round throughput
ratios is reported with its quartiles (the thesis: +0.1-0.2% FLOPs, so the goal is a ratio of at least 0.97; at
batch 8 on a GPU, where a forward is short enough for kernel launches to count, at least 0.90 compiled). Also
reported: the share of the CA-Stream forward spent in the stream itself, timed alone on the same stage features and
run as the mode runs the models, which a noisy machine disturbs far less than the ratio.

Modes: ``eager``; ``compile``, torch.compile in its default mode; ``reduce-overhead``, torch.compile with CUDA
graphs. Compiled forwards are whole graphs (``fullgraph=True``: a graph break is an error), one per batch size.
Inference in eval mode without autograd, in float32. Defaults: batches 8, 64 and 256, eager and compile on a GPU;
batch 8, eager on a CPU. ``--quick`` checks the script at toy sizes. Writes a JSON file and a bar chart of the
ratios into ``--out``, named by the time of the run.
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
COMPILED_BATCH_8_TARGET_RATIO = 0.90
COMPILE_MODES = {"compile": "default", "reduce-overhead": "reduce-overhead"}  # ours -> torch.compile's
DEFAULTS = {"cuda": dict(batches=[8, 64, 256], modes=["eager", "compile"]), "cpu": dict(batches=[8], modes=["eager"])}
FULL = dict(img_size=224, rounds=15)
QUICK = dict(models=["resnet18_castream"], img_size=64, batches=[2], rounds=3, modes=["eager", "compile"])


def run_as(fn, mode: str, backend: str):
    """``fn`` as ``mode`` runs it: itself, or compiled as one graph for the batch size it is first called with."""
    if mode == "eager":
        return fn
    compile_mode = dict(mode=COMPILE_MODES[mode]) if backend == "inductor" else {}
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, **compile_mode)


def seconds(fn, inputs, mode: str, device: torch.device) -> float:
    if mode == "reduce-overhead":  # every call a step of its own: CUDA graphs of the GAP and CA-Stream forwards
        torch.compiler.cudagraph_mark_step_begin()
    return timed(lambda: fn(inputs), device)[0]


def stream_only(model):
    """The stream alone, on given stage features: what the CA-Stream forward adds to its backbone's."""

    def run(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        query = model.stream.query.expand(features[0].shape[0], -1)
        for block, feats in zip(model.stream.blocks, features, strict=True):
            query, attention = block(query, feats)
        return query, attention  # returned, so that a compiler cannot drop the work

    return run


@torch.no_grad()
def compare(name: str, img_size: int, batch: int, mode: str, rounds: int, device: torch.device,
            backend: str = "inductor") -> dict:
    torch._dynamo.reset()  # fresh graphs and CUDA graph pools for each model, batch and mode
    model = timm.create_model(name).eval().to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    runs = {"gap": run_as(model.backbone, mode, backend), "castream": run_as(model, mode, backend)}
    features = list(model._stage_features(x))[model.stream_start:]
    stream = run_as(stream_only(model), mode, backend)
    for _ in range(3):  # warm-up: compilation, then CUDA graph recording
        for fn in runs.values():
            seconds(fn, x, mode, device)
        seconds(stream, features, mode, device)
    times = {key: [] for key in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            times[key].append(seconds(runs[key], x, mode, device))
    stream_seconds = statistics.median(seconds(stream, features, mode, device) for _ in range(rounds))
    gap, castream = (statistics.median(times[key]) for key in runs)
    # per-round ratios pair runs that saw the same load; their median and quartiles show the noise
    quartiles = statistics.quantiles([g / c for g, c in zip(times["gap"], times["castream"], strict=True)], n=4)
    return dict(model=name, mode=mode, batch=batch, gap_img_per_s=batch / gap, castream_img_per_s=batch / castream,
                ratio=quartiles[1], ratio_q1=quartiles[0], ratio_q3=quartiles[2],
                stream_share=stream_seconds / castream)


def ratio_figure(setting: str, modes: list[str], rows: list[dict]):
    """One panel per mode, one above the other: each model's ratio at each batch size, its quartiles, the goals."""
    columns = len({(row["model"], row["batch"]) for row in rows})
    figure, axes = grid(len(modes), 1, cell=(max(3.0, 1 + 0.45 * columns), 3.5))
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        shown = [row for row in rows if row["mode"] == mode]
        errors = [[row["ratio"] - row["ratio_q1"] for row in shown], [row["ratio_q3"] - row["ratio"] for row in shown]]
        labels = [f"{row['model'].removesuffix('_castream')} b{row['batch']}" for row in shown]
        ax.bar(labels, [row["ratio"] for row in shown], yerr=errors, capsize=3)
        ax.axhline(TARGET_RATIO, color="red", linestyle="--", label=f"goal {TARGET_RATIO}")
        if mode != "eager":
            ax.axhline(COMPILED_BATCH_8_TARGET_RATIO, color="orange", linestyle=":",
                       label=f"goal {COMPILED_BATCH_8_TARGET_RATIO} at batch 8")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylim(min(0.85, *(row["ratio_q1"] - 0.02 for row in shown)), 1.05)
        ax.set_ylabel("CA-Stream / GAP throughput")
        ax.set_title(mode, fontsize=9)
        ax.legend(fontsize=7)
        setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    figure.suptitle(setting, fontsize=8)
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="default: every CA-Stream model")
    parser.add_argument("--img-size", type=int, help=f"default: {FULL['img_size']}")
    parser.add_argument("--batches", "--batch", type=int, nargs="+", help="default: 8 64 256 on a GPU, 8 on a CPU")
    parser.add_argument("--modes", nargs="+", choices=["eager", *COMPILE_MODES],
                        help="default: eager compile on a GPU, eager on a CPU")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile's backend for the compiled modes (aot_eager: traced graphs without "
                             "inductor, quick to check that nothing breaks)")
    parser.add_argument("--rounds", type=int, help=f"default: {FULL['rounds']}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    device_defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    defaults = {"models": zoo.list_models("*_castream"), **FULL, **device_defaults, **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    runs = [(name, batch, mode) for name in args.models for batch in args.batches for mode in args.modes]
    rows = [compare(name, args.img_size, batch, mode, args.rounds, device, args.backend)
            for name, batch, mode in tqdm(runs, desc="model, batch, mode")]
    setting = f"{device_name(device)}, {args.img_size} px, float32, median of {args.rounds} rounds"
    print(f"Forward throughput, CA-Stream vs its GAP backbone ({setting})")
    print(f"{'model':26s} {'mode':>15s} {'batch':>5s} {'GAP img/s':>10s} {'CA img/s':>10s} {'ratio':>7s} "
          f"{'quartiles':>13s} {'stream share':>13s}")
    for row in rows:
        print(f"{row['model']:26s} {row['mode']:>15s} {row['batch']:5d} {row['gap_img_per_s']:10.2f} "
              f"{row['castream_img_per_s']:10.2f} {row['ratio']:7.3f} {row['ratio_q1']:6.3f}-{row['ratio_q3']:.3f} "
              f"{100 * row['stream_share']:12.2f}%")
    results = dict(setting=setting, torch=torch.__version__, backend=args.backend, rows=rows)
    save_run(args.out, "castream_throughput", results, figure=ratio_figure(setting, args.modes, rows))


if __name__ == "__main__":
    main()
