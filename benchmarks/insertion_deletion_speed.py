"""Speed of insertion + deletion (``zoo.evaluation.metrics.curves``), ours batched vs a straightforward loop.

    python benchmarks/insertion_deletion_speed.py [--quick] [--device cpu|cuda] [--out results/benchmark]
                                                  [--runs MODEL:PROTOCOL:IMAGES ...] [--batch-size B] [--rounds 2]

For each run, both curves of the whole protocol for IMAGES images at 224 px: ours (every (image, step) pair built
at once and sent through the model ``--batch-size`` at a time; default ``perturbation_curves``' own: 8 on a CPU, on
a GPU as many as half its free memory holds) and a straightforward loop (one image and one step at a time, copying
the next pixels into the current image, as RISE's code does), alternated over ``--rounds`` rounds in the same
process (the fastest round of each is reported: the machine is shared), with the largest difference between their
curves and scores. Beside them, the ceiling: how much faster the model's forwards alone run in batches than one
image at a time on this device (the protocol fixes the number of forwards, so no implementation with the same
scores can beat the loop by more than that).

Models are random-initialised timm models (no weights can be downloaded here); images are crops of a
photograph shipped with matplotlib, maps their Grad-CAM maps, targets the predicted classes. The default runs
take 3-6 minutes on this project's shared 2-core CPU (ResNet-50 with the 224-step "thesis" protocol would add
about 2-4 minutes per image and round, so it is left out; add ``--runs resnet50:thesis:1`` for it). On a CPU
shared with other jobs, ``--threads 1`` gives much steadier timings. Writes a JSON file, a Markdown table and
a bar chart of images/s into ``--out``, named by the time of the run.
"""

import argparse
import time
from pathlib import Path

import timm
import torch
from matplotlib.figure import Figure
from measure import device_name, save_run, timed

from zoo.data.photo import photo_crops
from zoo.evaluation.metrics.curves import PROTOCOLS, area_under_curve, blur, perturbation_curves
from zoo.evaluation.saliency import explain
from zoo.evaluation.saliency.core import forward_batch

FULL = ["resnet18:released:8", "resnet50:released:4", "resnet18:thesis:1"]
QUICK = ["resnet18:released:2", "resnet18:thesis:1"]


def straightforward_curves(model, images, maps, targets, protocol):
    """Insertion and deletion one image and one step at a time, with nothing done to make it fast."""
    height, width = images.shape[-2:]
    per_step = protocol.pixels_per_step(height, width)
    insertion, deletion = [], []
    with torch.no_grad():
        for image, saliency, target in zip(images, maps, targets, strict=True):
            order = saliency.flatten().argsort(descending=True, stable=True)
            for curves, start, finish in (
                    (insertion, blur(image[None], protocol.blur_size, protocol.blur_sigma), image[None]),
                    (deletion, image[None].clone(), torch.full_like(image[None], protocol.deletion_value))):
                current, row = start.clone(), []
                for step in range(protocol.steps + 1):
                    row.append(model(current).softmax(1)[0, target])
                    pixels = order[step * per_step:(step + 1) * per_step]
                    current.flatten(2)[0][:, pixels] = finish.flatten(2)[0][:, pixels]
                curves.append(torch.stack(row))
    return torch.stack(insertion), torch.stack(deletion)


def batching_ceiling(model, images, forwards, batch_size, rounds, device):
    """(loop s, batched s) of ``forwards`` forwards of ``images`` cycled, one at a time and ``batch_size`` at a
    time, alternated over ``rounds`` (fastest of each): forwards only, the loop's and our work without the rest."""
    stack = images[torch.arange(forwards) % len(images)]
    with torch.no_grad():
        runs = {"loop": lambda: [model(image[None]) for image in stack],
                "batched": lambda: [model(part) for part in stack.split(batch_size)]}
        times = {name: [] for name in runs}
        for r in range(rounds):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                times[name].append(timed(runs[name], device)[0])
    return min(times["loop"]), min(times["batched"])


def compare(arch, protocol_name, count, size, batch_size, rounds, device):
    torch.manual_seed(0)
    model = timm.create_model(arch).eval().to(device)
    images = photo_crops(model, count, size).to(device)
    batch_size = batch_size or forward_batch(model, images[0], cpu=8)  # perturbation_curves' own default
    with torch.no_grad():
        targets = model(images).argmax(1)
    maps = explain(model, images, "gradcam", targets)
    protocol = PROTOCOLS[protocol_name]
    print(f"{arch} {protocol_name}: {count} images at {size} px, {2 * protocol.steps + 1} forwards each ...",
          flush=True)
    runs = {"ours": lambda: perturbation_curves(model, images, maps, targets, protocol, batch_size),
            "loop": lambda: straightforward_curves(model, images, maps, targets, protocol)}
    times, results = {"ours": [], "loop": []}, {}
    for r in range(rounds):  # alternate, so both see the same machine load
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            seconds, results[name] = timed(runs[name], device)
            times[name].append(seconds)
    ours_s, loop_s, ours, loop = min(times["ours"]), min(times["loop"]), results["ours"], results["loop"]
    curve_diff = max((ours.insertion - loop[0]).abs().max().item(), (ours.deletion - loop[1]).abs().max().item())
    score_diff = max((area_under_curve(ours.insertion) - area_under_curve(loop[0])).abs().max().item(),
                     (area_under_curve(ours.deletion) - area_under_curve(loop[1])).abs().max().item())
    loop_forwards_s, batched_forwards_s = batching_ceiling(model, images, 8 * batch_size, batch_size, rounds, device)
    return dict(model=arch, protocol=protocol_name, steps=protocol.steps, images=count, size=size,
                batch_size=batch_size, rounds=rounds, ceiling=loop_forwards_s / batched_forwards_s,
                ours_s=ours_s, loop_s=loop_s, ours_images_per_s=count / ours_s, loop_images_per_s=count / loop_s,
                speedup=loop_s / ours_s, max_abs_diff_curves=curve_diff, max_abs_diff_scores=score_diff,
                insertion=area_under_curve(ours.insertion).mean().item(),
                deletion=area_under_curve(ours.deletion).mean().item())


def markdown(setting, rows):
    lines = [f"Measured {setting}.", "",
             "| model | protocol | images | px | batch | ours s | ours img/s | loop s | loop img/s | speed-up "
             "| ceiling (forwards alone, batched vs one at a time) | max abs diff (curves / scores) | insertion "
             "| deletion |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['protocol']} ({r['steps']} steps) | {r['images']} | {r['size']} | "
              f"{r['batch_size']} | {r['ours_s']:.1f} | {r['ours_images_per_s']:.3f} | {r['loop_s']:.1f} | "
              f"{r['loop_images_per_s']:.3f} | {r['speedup']:.2f}x | {r['ceiling']:.2f}x | "
              f"{r['max_abs_diff_curves']:.1e} / {r['max_abs_diff_scores']:.1e} | "
              f"{r['insertion']:.4f} | {r['deletion']:.4f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (32 px): checks the script, measures nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", nargs="+", metavar="MODEL:PROTOCOL:IMAGES", default=None,
                        help=f"default: {' '.join(FULL)}")
    parser.add_argument("--size", type=int, default=224, help="image size in pixels")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="our forward batch (default: perturbation_curves' own)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = device_name(device)
    setting = f"on {where}, {time.strftime('%Y-%m-%d')}"
    runs = args.runs or (QUICK if args.quick else FULL)
    size = 32 if args.quick else args.size

    rows = []
    for run in runs:
        arch, protocol_name, count = run.split(":")
        if protocol_name not in PROTOCOLS:
            parser.error(f"unknown protocol {protocol_name!r} in {run!r}; known: {', '.join(PROTOCOLS)}")
        rounds = 1 if args.quick else args.rounds
        rows.append(compare(arch, protocol_name, int(count), size, args.batch_size, rounds, device))
        print(f"  ours {rows[-1]['ours_s']:.1f} s, loop {rows[-1]['loop_s']:.1f} s, max abs diff "
              f"{rows[-1]['max_abs_diff_curves']:.1e}", flush=True)

    table = markdown(setting, rows)
    print(table)
    labels = [f"{r['model']}\n{r['protocol']}" for r in rows]
    positions = torch.arange(len(rows)).tolist()
    fig = Figure(figsize=(1.5 + 1.6 * len(rows), 3.8))
    ax = fig.subplots()
    ax.bar([p - 0.2 for p in positions], [r["ours_images_per_s"] for r in rows], 0.4, label="ours (batched)")
    ax.bar([p + 0.2 for p in positions], [r["loop_images_per_s"] for r in rows], 0.4, label="per-image, per-step loop")
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylabel("images / s (insertion + deletion)")
    ax.set_title(f"Insertion + deletion speed {setting}", fontsize=8)
    ax.legend(fontsize=8)
    save_run(args.out, "insertion_deletion_speed", dict(setting=setting, rows=rows), table, fig)
    return rows


if __name__ == "__main__":
    main()
