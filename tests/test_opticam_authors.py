"""Opti-CAM against a straightforward per-image loop with the authors' definitions written out, the authors'
stopping rule (``stop="batch_sum"``) against their batch loop, and the thesis' normalisation ablation (Table 2.8)
through the harness."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from data_layouts import make_image_folder
from timm.data import resolve_data_config

from zoo.evaluation import harness
from zoo.evaluation.saliency import explain, normalise_per_image, opticam
from zoo.evaluation.saliency.opticam import mask_of

SIZE = 96  # a 3x3 grid at ResNet-18's last block
ITERATIONS = 5
NORMALISATIONS = {  # n of thesis eq. 2.9-2.11
    "range": lambda a: (a - a.min()) / (a.max() - a.min()),
    "max": lambda a: a / a.max(),
    "sigmoid": torch.sigmoid,
}


def authors_opticam(model, pixels, target, normalisation, mean, std):
    """One image [3, H, W] in [0, 1]: Opti-CAM as the authors' demo computes it, with nothing done to make
    it fast. Returns the optimised mask ``n(up(S(x; u*)))`` (eq. 2.6-2.7) [H, W]."""
    net = lambda x: model((x - mean) / std)  # noqa: E731  (the normalisation is the model's first step)
    seen = {}
    handle = model.layer4[-1].register_forward_hook(lambda module, inputs, output: seen.setdefault("A", output))
    net(pixels[None])
    handle.remove()
    features = seen["A"][0].detach().relu()  # [K, h, w], captured once
    u = torch.zeros(len(features), requires_grad=True)  # uniform initial weights
    optimizer = torch.optim.Adam([u], lr=0.1)

    def mask():
        saliency = (u.softmax(0)[:, None, None] * features).sum(0)  # eq. 2.4
        up = F.interpolate(saliency[None, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        return NORMALISATIONS[normalisation](up)

    for _ in range(ITERATIONS):
        logit = net(pixels[None] * mask())[0, target]  # eq. 2.6: the target logit of the masked image
        optimizer.zero_grad()
        (-logit).backward()
        optimizer.step()
    return mask().detach()


def authors_opticam_batch(model, pixels, targets, iterations, lr, mean, std):
    """A batch [B, 3, H, W] in [0, 1] as the authors' demo optimises it (range normalisation): one Adam on the
    whole batch's summed loss ``sum_i (f(x_i)_c - f(x_i * mask_i)_c)``, checked every ``iterations // 10`` steps;
    where it rose since the last check the loop stops and returns the mask that gave it. Returns the masks
    [B, H, W] and the step at which it stopped (``iterations``: never)."""
    net = lambda x: model((x - mean) / std).gather(1, targets[:, None]).squeeze(1)  # noqa: E731
    seen = {}
    handle = model.layer4[-1].register_forward_hook(lambda module, inputs, output: seen.setdefault("A", output))
    original = net(pixels).detach()
    handle.remove()
    features = seen["A"].detach().relu()  # [B, K, h, w], captured once
    u = torch.zeros(features.shape[:2], requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=lr)

    def mask():
        saliency = (u.softmax(1)[:, :, None, None] * features).sum(1, keepdim=True)  # eq. 2.4
        up = F.interpolate(saliency, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        return ((up - low) / (high - low))[:, 0]

    previous = float("inf")
    for step in range(iterations):
        current = mask()
        loss = (original - net(pixels * current[:, None])).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (iterations // 10) == 0:
            if loss.item() > previous:
                return current.detach(), step
            previous = loss.item()
    return mask().detach(), iterations


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    pixels = torch.rand(3, 3, SIZE, SIZE)
    config = resolve_data_config(model=model)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    return model, pixels, torch.tensor([0, 3, 7]), mean, std


@pytest.mark.parametrize("normalisation", sorted(NORMALISATIONS))
def test_opticam_returns_the_mask_the_authors_optimise(model_and_images, normalisation):
    model, pixels, targets, mean, std = model_and_images
    ours = explain(model, (pixels - mean) / std, "opticam", targets, iterations=ITERATIONS, tolerance=0,
                   normalisation=normalisation)
    masks = torch.stack([authors_opticam(model, image, int(target), normalisation, mean, std)
                         for image, target in zip(pixels, targets, strict=True)])
    assert ours.shape == (3, SIZE, SIZE) and ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close(ours, masks, atol=1e-5, rtol=0)


def test_batch_sum_stops_the_batch_where_the_authors_demo_does(model_and_images):
    model, pixels, targets, mean, std = model_and_images
    # checks at every 2nd step; a step size at which the summed loss soon rises (at lr 0.1 it falls for 50 steps)
    iterations, lr = 20, 1.0
    authors, stopped = authors_opticam_batch(model, pixels, targets, iterations, lr, mean, std)
    assert stopped < iterations  # the summed loss rose: the whole batch stopped there
    images = (pixels - mean) / std
    ours = explain(model, images, "opticam", targets, iterations=iterations, lr=lr, stop="batch_sum", tolerance=0)
    torch.testing.assert_close(ours, authors, atol=1e-5, rtol=0)
    # each image on its own goes on where the batch stopped
    per_image = explain(model, images, "opticam", targets, iterations=iterations, lr=lr)
    assert not torch.allclose(per_image, authors, atol=1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(stop="batch"), "opticam stop must be one of 'per_image', 'batch_sum', got 'batch'"),
    (dict(stop=None), "opticam stop must be one of"),
])
def test_stop_rule_is_checked(model_and_images, options, message):
    model, pixels, targets, mean, std = model_and_images
    with pytest.raises(ValueError, match=message):
        explain(model, (pixels - mean) / std, "opticam", targets, **options)


def test_range_masks_are_what_explain_returned_before(model_and_images, monkeypatch):
    # before, explain min-max normalised the saliency S(x; u*) after upsampling; the range mask adds only
    # the 1e-8 that keeps the optimisation's division finite
    model, pixels, targets, mean, std = model_and_images
    saliencies = []

    def recorded_mask_of(saliency, *args):
        saliencies.append(saliency.detach())
        return mask_of(saliency, *args)

    monkeypatch.setattr(opticam, "mask_of", recorded_mask_of)
    ours = explain(model, (pixels - mean) / std, "opticam", targets, iterations=ITERATIONS)
    torch.testing.assert_close(ours, normalise_per_image(saliencies[-1], (SIZE, SIZE)), atol=1e-6, rtol=0)


def test_the_harness_runs_the_normalisation_ablation(tmp_path, monkeypatch):
    # thesis Table 2.8: Opti-CAM's objective (mask, diff) by normalisation (range, max, sigmoid)
    returned = []

    def recorded_explain(*args, **options):
        returned.append(explain(*args, **options))
        return returned[-1]

    monkeypatch.setattr(harness, "explain", recorded_explain)
    make_image_folder(tmp_path / "data")
    harness.main(["resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"),
                  "--methods", "opticam", "--option", "opticam.normalisation=sigmoid",
                  "--option", "opticam.objective=diff", "--option", "opticam.iterations=2",
                  "--option", "opticam.stop=batch_sum",
                  "--metrics", "faithfulness", "--limit", "2", "--out", str(tmp_path / "out"),
                  "--img-size", "64", "--batch-size", "2", "--cpu"])
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"]["method_options"] == {
        "opticam": {"normalisation": "sigmoid", "objective": "diff", "iterations": 2, "stop": "batch_sum"}}
    assert {"AD", "AG", "AI"} <= set(results["methods"]["opticam"])
    # the maps measured are the sigmoid masks: the sigmoid of a non-negative saliency is at least 1/2
    assert returned and all(maps.min() >= 0.5 for maps in returned)
