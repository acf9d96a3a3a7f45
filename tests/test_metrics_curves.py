"""Insertion / deletion curves: by hand on a model whose probability is a known function of the pixels it
sees, against a straightforward per-image per-step loop, and against RISE's blur, torchcam and Quantus."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import MapsAsCAM
from scipy.ndimage import gaussian_filter
from scripts import run_script
from torch import nn

from zoo.evaluation.metrics import curves as curves_module
from zoo.evaluation.metrics.curves import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    PerturbationProtocol,
    area_under_curve,
    blur,
    gaussian_kernel,
    insertion_deletion,
    perturbation_curves,
)

TINY = PerturbationProtocol("tiny", steps=5, blur_size=3, blur_sigma=1.0)


class PixelWeights(nn.Module):
    """Two classes whose probabilities are exactly (s, 1 - s), where s sums the weights of the pixels still
    equal (in every channel) to those of one of the reference images."""

    def __init__(self, references, weights):
        super().__init__()
        self.references, self.weights = references, weights  # [R, C, H, W], [H, W] summing to < 1

    def forward(self, x):
        same = ((x[:, None] - self.references[None]).abs().amax(2) == 0).double()  # [n, R, H, W]
        s = (same * self.weights.double()).sum((-2, -1)).amax(1)
        return torch.stack([s, 1 - s], 1).log().float()


def _random_net(classes=5):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, classes))


# --- protocols and the area under the curve -----------------------------------------------------------

def test_presets():
    released, thesis = PROTOCOLS["released"], PROTOCOLS["thesis"]
    assert DEFAULT_PROTOCOL == "released"
    assert (released.steps, released.blur_size, released.blur_sigma, released.deletion_value) == (28, 5, 5.0, 0.0)
    assert (thesis.steps, thesis.blur_size, thesis.blur_sigma, thesis.deletion_value) == (224, 11, 5.0, 0.0)
    assert released.pixels_per_step(224, 224) == 224 * 8 and len(released.counts(224, 224)) == 29
    assert thesis.pixels_per_step(224, 224) == 224 and len(thesis.counts(224, 224)) == 225
    # other sizes keep the number of steps: ceil(H * W / steps) pixels per step, the last step capped
    assert released.pixels_per_step(16, 16) == 10
    assert released.counts(16, 16)[-4:] == [250, 256, 256, 256]
    assert TINY.counts(6, 6) == [0, 8, 16, 24, 32, 36]
    with pytest.raises(ValueError, match="blur_size must be a positive odd integer"):
        PerturbationProtocol("bad", steps=4, blur_size=4, blur_sigma=1.0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PerturbationProtocol("bad", steps=0, blur_size=3, blur_sigma=1.0)


def test_the_released_preset_is_the_authors_only_at_224_px_as_documented():
    """The numbers the module docstring and evaluation/README.md give at 224 and 96 px are the preset's; the
    authors' code (given: imsize / 8 steps, so 8 * imsize pixels each) agrees with it at 224 px only."""
    released = PROTOCOLS["released"]
    documented = {224: (1792, 1792), 96: (330, 306)}  # pixels per step, pixels of the last step
    for size, (per_step, last) in documented.items():
        counts = released.counts(size, size)
        assert released.pixels_per_step(size, size) == per_step and counts[-1] - counts[-2] == last
        assert len(counts) == 29 and counts[-1] == size * size  # evaluations; the last one fully perturbed
        authors_steps = size // 8
        assert authors_steps * 8 * size == size * size
        assert (authors_steps == released.steps) == (size == 224)
    assert PROTOCOLS["thesis"].counts(96, 96)[218:] == [42 * 218, 42 * 219, 9216, 9216, 9216, 9216, 9216]
    assert "at 96x96 this preset perturbs ceil(9216 / 28) = 330 pixels per step (the last step 306) in 29\n" \
           "  evaluations per curve, theirs 96 / 8 = 12 steps of 768 pixels in 13." in curves_module.__doc__
    readme = (Path(__file__).parents[1] / "evaluation" / "README.md").read_text()
    assert "| `released` | 28 steps of 1792 pixels, 29 evaluations | 28 steps of 330 pixels (the last 306), 29 " \
           "evaluations |" in readme
    assert "| the authors' code | 28 steps of 1792 pixels, 29 evaluations | 12 steps of 768 pixels, 13 evaluations |" \
           in readme
    assert "| `thesis` | 224 steps of 224 pixels, 225 evaluations | 224 steps of 42 pixels (the 220th 18, the last 4 " \
           "none), 225 evaluations |" in readme


def test_area_under_known_curves():
    steps = 28
    rising = torch.linspace(0, 1, steps + 1)
    curves = torch.stack([rising, 1 - rising, torch.full((steps + 1,), 0.3)])
    torch.testing.assert_close(area_under_curve(curves), torch.tensor([0.5, 0.5, 0.3]))
    # (0/2 + 1 + 1/2) / 2 and (1/2 + 0 + 1/2) / 2, the trapezoid rule by hand; any leading shape
    torch.testing.assert_close(area_under_curve(torch.tensor([[[0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0]]])),
                               torch.tensor([[0.75], [0.5]]))
    with pytest.raises(ValueError, match="at least 2 points"):
        area_under_curve(torch.tensor([0.5]))


def test_area_matches_quantus_auc_normalised_by_steps(monkeypatch):
    """Quantus' calculate_auc is the trapezoid rule with unit spacing (not normalised): ours times the number
    of steps. Quantus 0.6 calls np.trapz, which NumPy 2.4 removed; the test restores it as np.trapezoid."""
    utils = importlib.import_module("quantus.helpers.utils")
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    curves = torch.rand(4, 29, dtype=torch.float64)
    theirs = utils.calculate_auc(curves.numpy(), batched=True) / 28
    torch.testing.assert_close(area_under_curve(curves), torch.from_numpy(theirs))


@pytest.mark.parametrize("size, sigma", [(11, 5.0), (5, 5.0), (3, 1.0)])
def test_blur_is_rises(size, sigma):
    # RISE's gkern: scipy's gaussian_filter run over a delta, then conv2d per channel with zero padding
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    kernel = torch.from_numpy(gaussian_filter(delta, sigma))
    torch.testing.assert_close(gaussian_kernel(size, sigma, torch.float64), kernel, atol=1e-12, rtol=0)
    images = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    rise = torch.zeros(3, 3, size, size, dtype=torch.float64)
    for c in range(3):
        rise[c, c] = kernel
    torch.testing.assert_close(blur(images, size, sigma), F.conv2d(images, rise, padding=size // 2))


# --- curves by hand ---------------------------------------------------------------------------------------

def test_curves_are_known_functions_of_the_perturbed_pixels():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 6, 6)
    weights = torch.rand(6, 6)
    weights = 0.9 * weights / weights.sum()
    model = PixelWeights(images, weights)
    maps = torch.rand(2, 6, 6)
    curves = perturbation_curves(model, images, maps, targets=[0, 1], protocol=TINY, batch_size=4)
    for i in range(2):
        ordered = weights.flatten()[maps[i].flatten().argsort(descending=True)]  # distinct map values
        seen = torch.tensor([ordered[:k].sum() for k in TINY.counts(6, 6)])  # original pixels after insertion
        total = weights.sum()
        expected_insertion, expected_deletion = seen, total - seen
        if i == 1:  # target 1 has probability 1 - s
            expected_insertion, expected_deletion = 1 - expected_insertion, 1 - expected_deletion
        torch.testing.assert_close(curves.insertion[i], expected_insertion, atol=1e-6, rtol=0)
        torch.testing.assert_close(curves.deletion[i], expected_deletion, atol=1e-6, rtol=0)
    # insertion ends at the original image, deletion ends with nothing of it left
    torch.testing.assert_close(curves.insertion[0, -1], weights.sum(), atol=1e-6, rtol=0)
    assert curves.deletion[0, -1] == 0 and curves.insertion[0, 0] == 0


def test_pixels_go_in_descending_saliency_ties_in_raster_order():
    # one pixel per step: each step's probability increment names the pixel inserted
    references = torch.randn(1, 3, 3, 3)
    weights = torch.arange(1, 10, dtype=torch.float32).view(3, 3) / 100  # pixel p has weight (p + 1) / 100
    maps = torch.tensor([[[0.5, 1.0, 0.5], [0.0, 0.2, 0.0], [0.2, 0.0, 0.0]]])
    one_by_one = PerturbationProtocol("one by one", steps=9, blur_size=3, blur_sigma=1.0)
    curves = perturbation_curves(PixelWeights(references, weights), references, maps, [0], protocol=one_by_one)
    inserted = (curves.insertion[0].diff() * 100).round().long() - 1
    assert inserted.tolist() == [1, 0, 2, 4, 6, 3, 5, 7, 8]
    deleted = (-curves.deletion[0].diff() * 100).round().long() - 1
    assert deleted.tolist() == inserted.tolist()


def test_an_all_zero_map_follows_raster_order_and_a_single_peak_goes_first():
    references = torch.randn(2, 3, 2, 2)
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.35]])
    maps = torch.zeros(2, 2, 2)
    maps[1, 1, 0] = 1.0  # single peak at pixel 2
    steps = PerturbationProtocol("one by one", steps=4, blur_size=3, blur_sigma=1.0)
    curves = perturbation_curves(PixelWeights(references, weights), references, maps, [0, 0], protocol=steps)
    torch.testing.assert_close(curves.insertion[0], torch.tensor([0.0, 0.1, 0.3, 0.6, 0.95]))
    torch.testing.assert_close(curves.insertion[1], torch.tensor([0.0, 0.3, 0.4, 0.6, 0.95]))


def test_end_points_are_the_original_the_blurred_and_the_deleted_images():
    net = _random_net().eval()
    images, maps, targets = torch.randn(3, 3, 8, 8), torch.rand(3, 8, 8), torch.tensor([4, 0, 2])
    for name in ("released", "thesis"):
        protocol = PROTOCOLS[name]
        curves = perturbation_curves(net, images, maps, targets, protocol=name)
        assert curves.insertion.shape == curves.deletion.shape == (3, protocol.steps + 1)

        def probability(x):
            with torch.no_grad():
                return net(x).softmax(1)[torch.arange(3), targets]

        original = probability(images)
        torch.testing.assert_close(curves.insertion[:, -1], original)
        torch.testing.assert_close(curves.deletion[:, 0], original)
        torch.testing.assert_close(curves.deletion[:, -1], probability(torch.zeros_like(images)))
        torch.testing.assert_close(curves.insertion[:, 0],
                                   probability(blur(images, protocol.blur_size, protocol.blur_sigma)))


# --- batched == straightforward loop ---------------------------------------------------------------------

def straightforward_curves(model, images, maps, targets, protocol, probabilities="softmax"):
    """One image and one step at a time, as RISE's code does: copy the next pixels from the finish image. The
    probability: the softmax over the classes, or the sigmoid of the target's logit (the authors' on VOC)."""
    model.eval()
    height, width = images.shape[-2:]
    per_step = protocol.pixels_per_step(height, width)
    insertion, deletion = [], []
    for image, saliency, target in zip(images, maps, targets, strict=True):
        order = saliency.flatten().argsort(descending=True, stable=True)
        for curves, start, finish in (
                (insertion, blur(image[None], protocol.blur_size, protocol.blur_sigma), image[None]),
                (deletion, image[None].clone(), torch.full_like(image[None], protocol.deletion_value))):
            current, row = start.clone(), []
            for step in range(protocol.steps + 1):
                with torch.no_grad():
                    logits = model(current)[0]
                row.append(logits.softmax(0)[target] if probabilities == "softmax" else logits[target].sigmoid())
                pixels = order[step * per_step:(step + 1) * per_step]
                current.flatten(2)[0][:, pixels] = finish.flatten(2)[0][:, pixels]
            curves.append(torch.stack(row))
    return torch.stack(insertion), torch.stack(deletion)


@pytest.mark.parametrize("probabilities", ["softmax", "sigmoid"])
@pytest.mark.parametrize("protocol, size", [(TINY, 8), (PROTOCOLS["released"], 16)])
def test_batched_curves_equal_a_straightforward_loop(protocol, size, probabilities):
    # ("thesis" differs from "released" only in its numbers, and its 449 single-image forwards are slow)
    net = _random_net()
    net.train()
    images, maps, targets = torch.randn(2, 3, size, size), torch.rand(2, size, size), torch.tensor([1, 4])
    curves = perturbation_curves(net, images, maps, targets, protocol=protocol, batch_size=7,
                                 probabilities=probabilities)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    insertion, deletion = straightforward_curves(net, images, maps, targets, protocol, probabilities)
    torch.testing.assert_close(curves.insertion, insertion, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(curves.deletion, deletion, atol=1e-6, rtol=1e-5)
    scores = insertion_deletion(net, images, maps, targets, protocol, 7, probabilities)
    torch.testing.assert_close(scores.insertion, area_under_curve(insertion), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.deletion, area_under_curve(deletion), atol=1e-6, rtol=1e-5)


def test_batch_size_tuple_outputs_and_default_targets():
    net = _random_net().eval()
    images, maps = torch.randn(3, 3, 8, 8), torch.rand(3, 8, 8)
    predicted = net(images).argmax(1)
    reference = perturbation_curves(net, images, maps, predicted, protocol=TINY, batch_size=1000)
    for batch_size in (1, 5):
        curves = perturbation_curves(net, images, maps, predicted, protocol=TINY, batch_size=batch_size)
        torch.testing.assert_close(curves.insertion, reference.insertion, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(curves.deletion, reference.deletion, atol=1e-6, rtol=1e-5)

    class WithExtra(nn.Module):  # returns (logits, something else), as zoo models do
        def forward(self, x):
            return net(x), x.mean()

    curves = perturbation_curves(WithExtra(), images, maps, protocol=TINY)  # targets: the predicted classes
    torch.testing.assert_close(curves.deletion, reference.deletion, atol=1e-6, rtol=1e-5)
    scores = insertion_deletion(net, images, maps, predicted, protocol=TINY)
    torch.testing.assert_close(scores.insertion, area_under_curve(reference.insertion), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.deletion, area_under_curve(reference.deletion), atol=1e-6, rtol=1e-5)


def test_bfloat16_autocast_runs_every_forward_in_it_and_agrees_with_float32():
    torch.manual_seed(0)
    net = _random_net().eval()
    with torch.no_grad():
        net[-1].weight *= 20  # spread probabilities, as a trained model's
    images, maps = torch.randn(3, 3, 16, 16), torch.rand(3, 16, 16)
    dtypes = []
    handle = net[-1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    exact = perturbation_curves(net, images, maps, protocol=TINY, batch_size=4)
    fast = perturbation_curves(net, images, maps, protocol=TINY, batch_size=4, amp_dtype="bfloat16")
    handle.remove()
    assert set(dtypes[:len(dtypes) // 2]) == {torch.float32} and set(dtypes[len(dtypes) // 2:]) == {torch.bfloat16}
    assert fast.insertion.dtype == torch.float32 and exact.insertion.std() > 0.05
    # bfloat16 logits carry 8 bits: probabilities within 2e-2, areas within 1e-2 (measured 2026-12-04: 4e-3, 2e-3)
    for ours, reference in zip(fast, exact, strict=True):
        torch.testing.assert_close(ours, reference, atol=2e-2, rtol=0)
        torch.testing.assert_close(area_under_curve(ours), area_under_curve(reference), atol=1e-2, rtol=0)
    assert torch.is_autocast_enabled("cpu") is False


def test_bad_inputs_are_named():
    net = _random_net().eval()
    images, maps = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match=r"maps are \(8, 6\) but images are \(8, 8\)"):
        perturbation_curves(net, images, torch.rand(2, 8, 6), [0, 1])
    bad = maps.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="maps holds NaN or Inf at 1 of 128"):
        perturbation_curves(net, images, bad, [0, 1])
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        perturbation_curves(net, images, bad, [0, 1])
    with pytest.raises(ValueError, match="targets must be 2 integer class indices"):
        perturbation_curves(net, images, maps, [0, 1, 2])
    with pytest.raises(ValueError, match="targets must be 2 integer class indices"):
        perturbation_curves(net, images, maps, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in \[0, 5\]"):
        perturbation_curves(net, images, maps, [0, 5])
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        perturbation_curves(net, images, maps, [-1, 0])
    with pytest.raises(ValueError, match="3 maps for 2 images"):
        perturbation_curves(net, images, torch.rand(3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match=r"maps must be a float tensor of maps \[N, H, W\]"):
        perturbation_curves(net, images, maps[:, None], [0, 1])
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, C, H, W\]"):
        perturbation_curves(net, images[0], maps, [0, 1])
    with pytest.raises(ValueError, match="unknown protocol 'rise'"):
        perturbation_curves(net, images, maps, [0, 1], protocol="rise")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        perturbation_curves(net, images, maps, [0, 1], batch_size=0)
    with pytest.raises(ValueError, match="probabilities must be one of softmax, sigmoid, got 'logit'"):
        perturbation_curves(net, images, maps, [0, 1], probabilities="logit")


# --- cross-checks with independent implementations --------------------------------------------------------

def test_scores_match_torchcam_deletion_insertion():
    """torchcam's DeletionInsertionMetric ranks pixels the same way (stable descending sort), takes
    ceil(pixels / steps) per step and integrates over the fraction actually perturbed, which is our i / steps
    when steps divides the pixel count (as at 224 px for both presets). One baseline serves both curves, so
    it runs once with zeros (our deletion) and once with our blur (our insertion)."""
    metrics = importlib.import_module("torchcam.metrics")
    from functools import partial

    net = _random_net().eval()
    images, maps, targets = torch.randn(4, 3, 10, 10), torch.rand(4, 10, 10), [0, 3, 4, 3]
    protocol = PerturbationProtocol("steps of 4", steps=25, blur_size=5, blur_sigma=5.0)
    ours = insertion_deletion(net, images, maps, targets, protocol=protocol)
    softmax = partial(torch.softmax, dim=-1)
    deletion = metrics.DeletionInsertionMetric(MapsAsCAM(net, maps), softmax, steps=25)
    deletion.update(images, class_idx=targets)
    insertion = metrics.DeletionInsertionMetric(MapsAsCAM(net, maps), softmax, steps=25,
                                                baseline=lambda x: blur(x, 5, 5.0))
    insertion.update(images, class_idx=targets)
    assert ours.deletion.mean().item() == pytest.approx(deletion.summary()["deletion_auc"], rel=1e-5)
    assert ours.insertion.mean().item() == pytest.approx(insertion.summary()["insertion_auc"], rel=1e-5)


def test_deletion_curve_matches_quantus_pixel_flipping(monkeypatch):
    """Quantus' PixelFlipping replaces features by a baseline in descending attribution order; it sorts the
    map broadcast over channels (C entries per pixel) and leaves out the unperturbed point, so with distinct
    map values and C x (pixels per step) features per step its curve is our deletion curve without its first
    point."""
    quantus = importlib.import_module("quantus")
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    net = _random_net().eval()
    images, maps, targets = torch.randn(2, 3, 6, 6), torch.rand(2, 6, 6), np.array([2, 0])
    protocol = PerturbationProtocol("steps of 4", steps=9, blur_size=3, blur_sigma=1.0)
    ours = perturbation_curves(net, images, maps, targets, protocol=protocol)
    metric = quantus.PixelFlipping(features_in_step=3 * 4, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True, display_progressbar=False)
    theirs = metric(model=net, x_batch=images.numpy(), y_batch=targets, a_batch=maps[:, None].numpy(),
                    device="cpu", softmax=True, channel_first=True)
    torch.testing.assert_close(ours.deletion[:, 1:], torch.tensor(theirs, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_speed_benchmark_quick_run(tmp_path):
    run_script("benchmarks/insertion_deletion_speed.py",
               ["--quick", "--runs", "resnet18:released:2", "--device", "cpu", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("insertion_deletion_speed-*.json")
    (row,) = json.loads(json_file.read_text())["rows"]
    assert (row["model"], row["protocol"], row["images"], row["size"]) == ("resnet18", "released", 2, 32)
    assert row["max_abs_diff_curves"] < 1e-5 and row["ours_s"] > 0 and row["loop_s"] > 0 and row["ceiling"] > 0
    assert json_file.with_suffix(".md").exists() and json_file.with_suffix(".png").exists()
