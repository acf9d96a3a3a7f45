"""Speed of our saliency methods, measured side by side with the references in one run.

    python benchmarks/saliency_speed.py [--quick] [--device cpu|cuda] [--out results/benchmark]

1. Grad-CAM and Score-CAM against pytorch-grad-cam (test-only extra) on the same model, batch and
   images: seconds per batch, speed-up, and how far apart the maps are; Score-CAM also with its
   forwards under autocast to ``--amp-dtype``.
2. Opti-CAM: ours on a whole batch (float32 and under autocast), ours one image at a time, and a
   straightforward per-image loop (the method as written in the paper: features once, Adam for all
   iterations, a model left as it comes, i.e. with parameter gradients), with AD / AG / AI of each.

Models are random-initialised timm models (no weights can be downloaded here), or for Opti-CAM a
trained one given as ``local-dir:FOLDER`` (e.g. a model the demo trained: the AD / AG / AI of a
random model mean nothing); images are crops of a photograph shipped with matplotlib. Writes a JSON
file, a Markdown table and a bar chart of the speed-ups into ``--out``, named by the time of the run.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's per-image progress bars

import numpy as np
import timm
import torch
from matplotlib.figure import Figure
from measure import device_name, save_run, timed
from pytorch_grad_cam import GradCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from zoo.data.photo import photo_crops
from zoo.evaluation.metrics import increased, relative_drop, relative_gain
from zoo.evaluation.saliency import default_layer, explain, mask_images, pixel_statistics
from zoo.evaluation.saliency.core import normalise_per_image
from zoo.evaluation.saliency.opticam import combine, mask_of
from zoo.metrics import METRICS, reported_value

REFERENCES = {"gradcam": GradCAM, "scorecam": ScoreCAM}
# (method, model, batch, image size): Score-CAM runs one forward per channel, so it gets smaller images
FULL = [("gradcam", "resnet18", 8, 224), ("gradcam", "resnet18", 32, 224), ("gradcam", "resnet50", 8, 224),
        ("gradcam", "resnet50", 32, 224), ("scorecam", "resnet18", 8, 96), ("scorecam", "resnet18", 32, 64),
        ("scorecam", "resnet50", 8, 64)]
QUICK = [("gradcam", "resnet18", 2, 64), ("scorecam", "resnet18", 2, 64)]


def against_pytorch_grad_cam(method, arch, batch, size, device, rounds, amp_dtype):
    torch.manual_seed(0)
    model = timm.create_model(arch).eval().to(device)
    images = photo_crops(model, batch, size).to(device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    layer = default_layer(model)

    def theirs():
        with REFERENCES[method](model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])

    def ours(**options):
        return lambda: explain(model, images, method, targets, **options).cpu().numpy()

    runs = {"ours": ours(), "theirs": theirs}
    if method == "scorecam" and amp_dtype:
        runs["ours_amp"] = ours(amp_dtype=amp_dtype)
    times, maps = {name: [] for name in runs}, {}
    for r in range(rounds):  # alternate, so all see the same machine load
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            seconds, maps[name] = timed(runs[name], device)
            times[name].append(seconds)
    theirs_s = float(np.median(times["theirs"]))
    row = dict(method=method, model=arch, batch=batch, size=size, theirs_s=theirs_s)
    for name in (name for name in runs if name.startswith("ours")):
        pairs = zip(maps[name], maps["theirs"], strict=True)
        correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs]
        suffix = name.removeprefix("ours")
        row.update({f"ours{suffix}_s": float(np.median(times[name])),
                    f"speedup{suffix}": theirs_s / float(np.median(times[name])),
                    f"max_abs_diff{suffix}": float(np.abs(maps[name] - maps["theirs"]).max()),
                    f"min_correlation{suffix}": float(np.nanmin(correlations))})
    return row


def straightforward_opticam(model, image, target, layer, iterations, lr, mean, std):
    """Opti-CAM for one image as the paper states it, with nothing done to make it fast."""
    features = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: features.setdefault("a", output))
    model(image)
    handle.remove()
    feats = features["a"].detach().relu()
    u = torch.zeros(1, feats.shape[1], device=image.device, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=lr)
    for _ in range(iterations):
        mask = mask_of(combine(u, feats), image.shape[-2:], "range")
        logit = model(mask_images(image, mask, mean, std))[0, target]
        optimizer.zero_grad()
        (-logit).backward()
        optimizer.step()
    return combine(u.detach(), feats)


def interpretability(model, images, maps, targets, mean, std):
    """AD, AG, AI of maps [B, H, W] in [0, 1] (thesis eq. 1.10, 2.8, 1.11), probabilities of the target class."""
    with torch.no_grad():
        p = model(images).softmax(1).gather(1, targets[:, None]).squeeze(1)
        o = model(mask_images(images, maps, mean, std)).softmax(1).gather(1, targets[:, None]).squeeze(1)
    return {key: reported_value(METRICS[key], per_image(p, o))
            for key, per_image in (("AD", relative_drop), ("AG", relative_gain), ("AI", increased))}


def opticam_comparison(arch, count, size, iterations, device, amp_dtype):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=arch.startswith("local-dir:")).eval().to(device)
    images = photo_crops(model, count, size).to(device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    mean, std = pixel_statistics(model, images)
    layer = default_layer(model)
    runs = {
        "ours, whole batch": lambda: explain(model, images, "opticam", targets, iterations=iterations),
        **({f"ours, whole batch, {amp_dtype} autocast": lambda: explain(
            model, images, "opticam", targets, iterations=iterations, amp_dtype=amp_dtype)} if amp_dtype else {}),
        "ours, one image at a time": lambda: torch.cat([
            explain(model, images[i:i + 1], "opticam", targets[i:i + 1], iterations=iterations)
            for i in range(count)]),
        "straightforward loop": lambda: torch.cat([
            normalise_per_image(straightforward_opticam(model, images[i:i + 1], targets[i], layer, iterations, 0.1,
                                                        mean, std), (size, size)) for i in range(count)]),
    }
    rows = []
    for name, fn in runs.items():
        print(f"  opticam: {name} ...", flush=True)
        seconds, maps = timed(fn, device)
        rows.append(dict(run=name, model=arch, images=count, size=size, iterations=iterations, seconds=seconds,
                         images_per_s=count / seconds, **interpretability(model, images, maps, targets, mean, std)))
    loop = rows[-1]["seconds"]
    for row in rows:
        row["speedup_vs_loop"] = loop / row["seconds"]
    return rows


def markdown(setting, amp_dtype, cam_rows, opticam_rows):
    lines = [f"Measured {setting}.", "",
             "| method | model | batch | px | pytorch-grad-cam s/batch | ours s/batch | speed-up | max abs diff "
             f"| ours, {amp_dtype} autocast, s/batch | speed-up | max abs diff | min correlation |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cam_rows:
        amp = (f"{r['ours_amp_s']:.3f} | {r['speedup_amp']:.2f}x | {r['max_abs_diff_amp']:.1e} | "
               f"{r['min_correlation_amp']:.4f}" if "ours_amp_s" in r else "- | - | - | -")
        lines.append(f"| {r['method']} | {r['model']} | {r['batch']} | {r['size']} | {r['theirs_s']:.3f} | "
                     f"{r['ours_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {amp} |")
    lines += ["", "| Opti-CAM run | model | images | px | iterations | s | images/s | speed-up vs loop "
                  "| AD | AG | AI |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['model']} | {r['images']} | {r['size']} | {r['iterations']} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.3f} | {r['speedup_vs_loop']:.2f}x | {r['AD']:.2f} | {r['AG']:.2f} | {r['AI']:.2f} |"
              for r in opticam_rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for Grad-CAM (median)")
    parser.add_argument("--opticam", nargs=4, metavar=("MODEL", "IMAGES", "PX", "ITERATIONS"),
                        default=["resnet18", "32", "112", "100"], help="MODEL: a timm name or local-dir:FOLDER")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16", "none"),
                        help="autocast dtype of the extra Score-CAM and Opti-CAM runs (none: no such runs)")
    parser.add_argument("--no-cams", action="store_true", help="only the Opti-CAM comparison")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = device_name(device)
    setting = f"on {where}, {time.strftime('%Y-%m-%d')}"
    amp_dtype = None if args.amp_dtype == "none" else args.amp_dtype

    cam_rows = []
    for method, arch, batch, size in [] if args.no_cams else QUICK if args.quick else FULL:
        print(f"{method} {arch} batch {batch} at {size} px ...", flush=True)
        rounds = args.rounds if method == "gradcam" else 1
        cam_rows.append(against_pytorch_grad_cam(method, arch, batch, size, device, rounds, amp_dtype))
    arch, count, size, iterations = args.opticam
    if args.quick:
        count, size, iterations = 2, 32, 2
    opticam_rows = opticam_comparison(arch, int(count), int(size), int(iterations), device, amp_dtype)

    table = markdown(setting, amp_dtype, cam_rows, opticam_rows)
    print(table)
    bars = []
    for r in cam_rows:
        bars.append((f"{r['method']}\n{r['model']} b{r['batch']}", r["speedup"]))
        if "speedup_amp" in r:
            bars.append((f"{r['method']} {amp_dtype}\n{r['model']} b{r['batch']}", r["speedup_amp"]))
    bars += [(f"opticam\n{r['run']}", r["speedup_vs_loop"]) for r in opticam_rows[:-1]]
    labels, speedups = zip(*bars, strict=True)
    fig = Figure(figsize=(1.2 + 1.1 * len(labels), 3.8))
    ax = fig.subplots()
    ax.bar(range(len(labels)), speedups)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("speed-up (reference time / ours)")
    ax.set_title(f"Saliency speed {setting}", fontsize=8)
    save_run(args.out, "saliency_speed", dict(setting=setting, cams=cam_rows, opticam=opticam_rows), table, fig)


if __name__ == "__main__":
    main()
