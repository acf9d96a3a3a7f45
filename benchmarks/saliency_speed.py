"""Speed of our saliency methods, measured side by side with the references in one run.

    python benchmarks/saliency_speed.py [--quick] [--device cpu|cuda] [--out results/benchmark]

1. Grad-CAM and Score-CAM against pytorch-grad-cam (test-only extra) on the same model, batch and
   images: seconds per batch, speed-up, and how far apart the maps are.
2. Opti-CAM: ours on a whole batch, ours one image at a time, and a straightforward per-image loop
   (the method as written in the paper: features once, Adam for all iterations, a model left as it
   comes, i.e. with parameter gradients), with AD / AG / AI of each to show they are equal.

Models are random-initialised timm models (no weights can be downloaded here); images are crops of a
photograph shipped with matplotlib. Writes a JSON file, a Markdown table and a bar chart of the
speed-ups into ``--out``, named by the time of the run.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's per-image progress bars

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM, ScoreCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from evaluation.metrics import average_drop, average_gain, average_increase  # noqa: E402
from evaluation.saliency import default_layer, explain, mask_images, pixel_statistics  # noqa: E402
from evaluation.saliency.core import normalise_per_image  # noqa: E402
from evaluation.saliency.opticam import combine, mask_of  # noqa: E402
from zoo.measure import device_name, save_run, timed  # noqa: E402
from zoo.samples import photo_crops  # noqa: E402

REFERENCES = {"gradcam": GradCAM, "scorecam": ScoreCAM}
# (method, model, batch, image size): Score-CAM runs one forward per channel, so it gets smaller images
FULL = [("gradcam", "resnet18", 8, 224), ("gradcam", "resnet18", 32, 224), ("gradcam", "resnet50", 8, 224),
        ("gradcam", "resnet50", 32, 224), ("scorecam", "resnet18", 8, 96), ("scorecam", "resnet18", 32, 64),
        ("scorecam", "resnet50", 8, 64)]
QUICK = [("gradcam", "resnet18", 2, 64), ("scorecam", "resnet18", 2, 64)]


def against_pytorch_grad_cam(method, arch, batch, size, device, rounds):
    torch.manual_seed(0)
    model = timm.create_model(arch).eval().to(device)
    images = photo_crops(model, batch, size).to(device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    layer = default_layer(model)

    def theirs():
        with REFERENCES[method](model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])

    def ours():
        return explain(model, images, method, targets).cpu().numpy()

    runs, times, maps = {"ours": ours, "theirs": theirs}, {"ours": [], "theirs": []}, {}
    for r in range(rounds):  # alternate, so both see the same machine load
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            seconds, maps[name] = timed(runs[name], device)
            times[name].append(seconds)
    ours_maps, their_maps = maps["ours"], maps["theirs"]
    ours_s, theirs_s = times["ours"], times["theirs"]
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours_maps, their_maps, strict=True)]
    return dict(method=method, model=arch, batch=batch, size=size, ours_s=float(np.median(ours_s)),
                theirs_s=float(np.median(theirs_s)), speedup=float(np.median(theirs_s) / np.median(ours_s)),
                max_abs_diff=float(np.abs(ours_maps - their_maps).max()),
                min_correlation=float(np.nanmin(correlations)))


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
    """AD, AG, AI of maps [B, H, W] in [0, 1] (SPEC §5), probabilities of the target class."""
    with torch.no_grad():
        p = model(images).softmax(1).gather(1, targets[:, None]).squeeze(1)
        o = model(mask_images(images, maps, mean, std)).softmax(1).gather(1, targets[:, None]).squeeze(1)
    return dict(AD=average_drop(p, o).item(), AG=average_gain(p, o).item(), AI=average_increase(p, o).item())


def opticam_comparison(arch, count, size, iterations, device):
    torch.manual_seed(0)
    model = timm.create_model(arch).eval().to(device)
    images = photo_crops(model, count, size).to(device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    mean, std = pixel_statistics(model, images)
    layer = default_layer(model)
    runs = {
        "ours, whole batch": lambda: explain(model, images, "opticam", targets, iterations=iterations),
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


def markdown(setting, cam_rows, opticam_rows):
    lines = [f"Measured {setting}.", "",
             "| method | model | batch | px | ours s/batch | pytorch-grad-cam s/batch | speed-up | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['model']} | {r['batch']} | {r['size']} | {r['ours_s']:.3f} | {r['theirs_s']:.3f} "
              f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |" for r in cam_rows]
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
                        default=["resnet18", "32", "112", "100"])
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = device_name(device)
    setting = f"on {where}, {time.strftime('%Y-%m-%d')}"

    cam_rows = []
    for method, arch, batch, size in QUICK if args.quick else FULL:
        print(f"{method} {arch} batch {batch} at {size} px ...", flush=True)
        rounds = args.rounds if method == "gradcam" else 1
        cam_rows.append(against_pytorch_grad_cam(method, arch, batch, size, device, rounds))
    arch, count, size, iterations = args.opticam
    if args.quick:
        count, size, iterations = 2, 32, 2
    opticam_rows = opticam_comparison(arch, int(count), int(size), int(iterations), device)

    table = markdown(setting, cam_rows, opticam_rows)
    print(table)
    labels = [f"{r['method']}\n{r['model']} b{r['batch']}" for r in cam_rows] + \
             [f"opticam\n{r['run']}" for r in opticam_rows[:-1]]
    speedups = [r["speedup"] for r in cam_rows] + [r["speedup_vs_loop"] for r in opticam_rows[:-1]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.8))
    ax.bar(range(len(labels)), speedups)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("speed-up (reference time / ours)")
    ax.set_title(f"Saliency speed {setting}", fontsize=8)
    fig.tight_layout()
    save_run(args.out, "saliency_speed", dict(setting=setting, cams=cam_rows, opticam=opticam_rows), table, fig)


if __name__ == "__main__":
    main()
