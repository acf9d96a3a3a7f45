"""ROAD and ARCC: noisy linear imputation by hand and against pytorch-grad-cam's ``NoisyLinearImputer`` (scipy's
sparse solver), the removal order on a model that sees one region only, the metrics against pytorch-grad-cam's
``ROAD*`` and ``ARCC``, and the harness' ``--metrics road``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_layouts import make_cub
from pytorch_grad_cam.metrics import arcc as reference_arcc
from pytorch_grad_cam.metrics import road as reference_road
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from test_harness import CUB_TEST, run
from torch import nn

from zoo.evaluation.harness import measure, metric_groups
from zoo.evaluation.metrics.adcc import coherency, complexity
from zoo.evaluation.metrics.curves import target_probabilities
from zoo.evaluation.metrics.inputs import COMPUTED_INPUTS
from zoo.evaluation.metrics.road import (
    ROAD_NOISE,
    ROAD_PERCENTAGES,
    RoadProbabilities,
    arcc,
    arcc_of_maps,
    noisy_linear_imputation,
    removal_masks,
    road_combined,
    road_lerf,
    road_morf,
    road_probabilities,
)
from zoo.metrics import METRICS

KEYS = ("ROAD-MoRF", "ROAD-LeRF", "ROAD", "ARCC")


def reference_imputation(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's imputer without noise, image by image (its mask: 1 kept, 0 imputed)."""
    imputer = reference_road.NoisyLinearImputer(noise=0.0)
    return torch.stack([imputer(image.float(), (~mask).float()) for image, mask in zip(images, removed, strict=True)])


def smooth_masks(count: int, size: int, share: float) -> torch.Tensor:
    """Large holes: the ``share`` of each image where an upsampled random field is highest."""
    field = F.interpolate(torch.rand(count, 1, 3, 3), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return field >= field.flatten(1).quantile(1 - share, dim=1)[:, None, None]


@pytest.fixture
def noiseless_reference(monkeypatch):
    """pytorch-grad-cam's ROAD with its imputer's noise set to 0 (its metrics build ``NoisyLinearImputer()``)."""

    class Noiseless(reference_road.NoisyLinearImputer):
        def __init__(self):
            super().__init__(noise=0.0)

    monkeypatch.setattr(reference_road, "NoisyLinearImputer", Noiseless)


# --- the imputation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, 17, 32])
def test_the_imputation_is_pytorch_grad_cams_solution(size):
    images = torch.randn(6, 3, size, size, dtype=torch.float64)
    removed = torch.cat([torch.rand(2, size, size) < torch.tensor([0.2, 0.8])[:, None, None],  # scattered
                         smooth_masks(2, size, 0.5), smooth_masks(1, size, 0.95),  # large holes, at the border
                         torch.ones(1, size, size, dtype=torch.bool)])
    removed[-1, 0, -1] = False  # one kept pixel, in a corner
    expected = reference_imputation(images, removed)
    exact = noisy_linear_imputation(images, removed, noise=0, tolerance=1e-12)
    torch.testing.assert_close(exact, expected.double(), atol=1e-6, rtol=0)  # the reference returns float32
    torch.testing.assert_close(exact[-1], images[-1, :, :1, -1:].expand_as(images[-1]))  # all that is left
    default = noisy_linear_imputation(images.float(), removed, noise=0)  # float32, tolerance 1e-6
    torch.testing.assert_close(default, expected, atol=1e-4, rtol=0)
    kept = ~removed[:, None].expand_as(images)
    assert torch.equal(default[kept], images.float()[kept])


def test_one_missing_pixel_by_hand():
    # a corner of a 3x3 image: 2 direct neighbours (1/6) and 1 diagonal (1/12), divided by the 5/12 present
    image = torch.arange(9.0).view(1, 1, 3, 3)
    corner = torch.zeros(1, 3, 3, dtype=torch.bool)
    corner[0, 0, 0] = True
    value = noisy_linear_imputation(image, corner, noise=0)[0, 0, 0, 0]
    assert value == pytest.approx((1 / 6 + 3 / 6 + 4 / 12) / (5 / 12))  # 2.4: uniform weights give 8 / 3
    # the centre: the weighted mean of all 8
    centre = torch.zeros(1, 3, 3, dtype=torch.bool)
    centre[0, 1, 1] = True
    image = torch.tensor([[[[5.0, 1.0, 7.0], [2.0, 0.0, 3.0], [11.0, 4.0, 13.0]]]])
    value = noisy_linear_imputation(image, centre, noise=0)[0, 0, 1, 1]
    assert value == pytest.approx((1 + 2 + 3 + 4) / 6 + (5 + 7 + 11 + 13) / 12)


def test_the_weights_and_the_border_renormalisation():
    """x^2 + y^2 is not reproduced: one missing pixel inside gets its value + sum_j w_j |d_j|^2 = + 4/3 (uniform
    weights 1/8 would give + 3/2), and at the border the renormalised one-sided mean; a linear image is reproduced
    exactly inside (any symmetric weighting), and a constant one everywhere."""
    size = 9
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    quadratic = (x**2 + y**2)[None, None]
    inside = torch.zeros(1, size, size, dtype=torch.bool)
    inside[0, 4, 5] = True
    imputed = noisy_linear_imputation(quadratic, inside, noise=0, tolerance=1e-12)
    assert imputed[0, 0, 4, 5].item() == pytest.approx(quadratic[0, 0, 4, 5].item() + 4 / 3)
    edge = torch.zeros(1, size, size, dtype=torch.bool)
    edge[0, 0, 4] = True  # top edge: below it 1/6, beside it 1/6 + 1/6, diagonally below 1/12 + 1/12; sum 2/3
    expected = (quadratic[0, 0, 1, 4] / 6 + (quadratic[0, 0, 0, 3] + quadratic[0, 0, 0, 5]) / 6
                + (quadratic[0, 0, 1, 3] + quadratic[0, 0, 1, 5]) / 12) / (2 / 3)
    imputed = noisy_linear_imputation(quadratic, edge, noise=0, tolerance=1e-12)
    assert imputed[0, 0, 0, 4].item() == pytest.approx(expected.item())
    linear = (2 * x - 3 * y + 1)[None, None].expand(2, 3, -1, -1)
    hole = torch.zeros(2, size, size, dtype=torch.bool)
    hole[:, 2:7, 1:8] = True
    torch.testing.assert_close(noisy_linear_imputation(linear, hole, noise=0, tolerance=1e-12), linear)
    constant = torch.full((1, 2, size, size), 0.7, dtype=torch.float64)
    border = smooth_masks(1, size, 0.9)
    torch.testing.assert_close(noisy_linear_imputation(constant, border, noise=0, tolerance=1e-12), constant)


def test_the_noise_is_gaussian_on_the_removed_pixels_only_and_seeded():
    images = torch.rand(4, 3, 24, 24)
    removed = smooth_masks(4, 24, 0.6)
    exact = noisy_linear_imputation(images, removed, noise=0)
    first = noisy_linear_imputation(images, removed, noise=0.05, generator=torch.Generator().manual_seed(1))
    again = noisy_linear_imputation(images, removed, noise=0.05, generator=torch.Generator().manual_seed(1))
    other = noisy_linear_imputation(images, removed, noise=0.05, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    inside = removed[:, None].expand_as(images)
    assert torch.equal(first[~inside], images[~inside])
    noise = (first - exact)[inside]
    assert len(noise) > 3000
    assert abs(noise.mean().item()) < 0.005 and noise.std().item() == pytest.approx(0.05, rel=0.05)
    # image by image from one generator: imputing in parts, in order, draws the same noise
    generator = torch.Generator().manual_seed(1)
    parts = torch.cat([noisy_linear_imputation(images[:1], removed[:1], 0.05, generator),
                       noisy_linear_imputation(images[1:], removed[1:], 0.05, generator)])
    torch.testing.assert_close(parts, first, atol=1e-5, rtol=0)  # the solver's own rounding only
    assert ROAD_NOISE == 0.01


def test_bad_imputation_input_is_named():
    images, removed = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8) < 0.5
    everything = removed.clone()
    everything[1] = True
    with pytest.raises(ValueError, match=r"removed takes every pixel of images \[1\].*singular"):
        noisy_linear_imputation(images, everything)
    with pytest.raises(ValueError, match="removed must be a bool tensor"):
        noisy_linear_imputation(images, removed.float())
    with pytest.raises(ValueError, match="removed must be a bool tensor"):
        noisy_linear_imputation(images, removed[:1])
    with pytest.raises(ValueError, match="images must be a float tensor"):
        noisy_linear_imputation(images[0], removed)
    with pytest.raises(ValueError, match="images holds NaN"):
        noisy_linear_imputation(images.index_fill(0, torch.tensor([0]), float("nan")), removed)
    with pytest.raises(ValueError, match="noise must be a finite standard deviation"):
        noisy_linear_imputation(images, removed, noise=-0.1)
    with pytest.raises(ValueError, match="tolerance must be positive"):
        noisy_linear_imputation(images, removed, tolerance=0)
    with pytest.raises(ValueError, match="max_iterations must be a positive integer"):
        noisy_linear_imputation(images, removed, max_iterations=0)
    with pytest.raises(RuntimeError, match="did not converge in 2 iterations"):
        noisy_linear_imputation(images, smooth_masks(2, 8, 0.9), max_iterations=2)


# --- which pixels are removed -----------------------------------------------------------------------------------

def test_removal_masks_count_order_and_ties():
    maps = torch.rand(3, 10, 12)
    maps[2] = 0.5  # all tied: raster order
    masks = removal_masks(maps, (10, 25, 90))
    assert masks.shape == (3, 2, 3, 10, 12) and masks.dtype == torch.bool
    counts = masks.flatten(3).sum(3)
    assert (counts == torch.tensor([12, 30, 108])).all()  # floor(k * 120 / 100)
    for i in range(2):
        ranked = maps[i].flatten().argsort(descending=True)
        assert set(masks[i, 0, 1].flatten().nonzero().flatten().tolist()) == set(ranked[:30].tolist())
        assert set(masks[i, 1, 1].flatten().nonzero().flatten().tolist()) == set(ranked[-30:].tolist())
    assert masks[2, 0, 0].flatten()[:12].all() and masks[2, 1, 0].flatten()[-12:].all()
    assert (masks[:, 0, 2] | masks[:, 1, 0]).all() and not (masks[:, 0, 2] & masks[:, 1, 0]).any()  # 90 + 10
    with pytest.raises(ValueError, match=r"percentages must be a non-empty sequence of integers in \[1, 99\]"):
        removal_masks(maps, (0, 50))
    with pytest.raises(ValueError, match="percentages must be"):
        removal_masks(maps, (12.5,))
    with pytest.raises(ValueError, match="maps must be a float tensor"):
        removal_masks(maps[0])


class LeftCheckerboard(nn.Module):
    """Two classes with logits (s, 0), s = 4 * the correlation of channel 0's left half with a checkerboard of
    +-1: the model sees the left half only, and any imputation there (a mean of neighbours of both signs) lowers s."""

    def forward(self, x):
        height, width = x.shape[-2:]
        checker = ((torch.arange(height)[:, None] + torch.arange(width // 2)[None]) % 2) * 2 - 1.0
        s = 4 * (x[:, 0, :, : width // 2] * checker).mean((1, 2))
        return torch.stack([s, torch.zeros_like(s)], 1)


def left_checkerboard(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are the checkerboard on the left half and noise on the right, and maps above 0.5 on the left
    half only."""
    images = torch.randn(count, 3, size, size)
    images[:, :, :, : size // 2] = ((torch.arange(size)[:, None] + torch.arange(size // 2)[None]) % 2) * 2 - 1.0
    maps = torch.rand(count, size, size) * 0.5
    maps[:, :, : size // 2] += 0.5
    return images, maps


@pytest.mark.parametrize("probabilities", ["softmax", "sigmoid"])
def test_morf_removes_what_the_model_sees_and_lerf_what_it_does_not(probabilities):
    """MoRF takes the left half first and the probability falls with every step; LeRF takes the right half first
    and, up to 50 %, leaves everything the model sees exactly as it was."""
    images, maps = left_checkerboard(2, 16)
    classes, model = torch.zeros(2, dtype=torch.long), LeftCheckerboard()
    p = target_probabilities(model(images), classes, probabilities)
    road = road_probabilities(model, images, maps, classes, probabilities=probabilities)
    assert road.probabilities.shape == (2, 2, 9) and road.percentages == ROAD_PERCENTAGES
    morf, lerf = road.probabilities[:, 0], road.probabilities[:, 1]
    assert torch.equal(lerf[:, :5], p[:, None].expand(-1, 5))  # 10 .. 50 %: the right half only
    assert (morf < p[:, None] - 0.01).all() and (lerf[:, 5:] < p[:, None]).all()
    assert (morf[:, :5].diff(dim=1) < 0).all()  # the more of the left half is gone, the lower
    assert (road_morf(p, road) < road_lerf(p, road)).all() and (road_combined(p, road) > 0.05).all()


def test_road_probabilities_are_reproducible_and_do_not_depend_on_the_batch_size():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    images, maps, classes = torch.randn(3, 3, 12, 12), torch.rand(3, 12, 12), torch.tensor([0, 1, 2])
    first = road_probabilities(model, images, maps, classes, percentages=(20, 50), noise=0.5, batch_size=5)
    again = road_probabilities(model, images, maps, classes, percentages=(20, 50), noise=0.5, batch_size=2)
    other = road_probabilities(model, images, maps, classes, percentages=(20, 50), noise=0.5, seed=1)
    torch.testing.assert_close(again.probabilities, first.probabilities, atol=1e-6, rtol=0)
    assert not torch.allclose(other.probabilities, first.probabilities)
    autocast = road_probabilities(model, images, maps, classes, percentages=(20, 50), noise=0.5, amp_dtype="bfloat16")
    torch.testing.assert_close(autocast.probabilities, first.probabilities, atol=2e-2, rtol=0)
    assert model.training  # its mode restored


def test_bad_road_input_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    images, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match="targets must be given"):
        road_probabilities(model, images, maps, None)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\)"):
        road_probabilities(model, images, maps, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="maps are"):
        road_probabilities(model, images, maps[:, :4], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="probabilities must be one of"):
        road_probabilities(model, images, maps, torch.tensor([0, 1]), probabilities="logits")
    road = RoadProbabilities(torch.rand(2, 2, 3), (10, 20, 30))
    with pytest.raises(ValueError, match=r"road probabilities must be a tensor \[3, 2, 3\]"):
        road_morf(torch.rand(3), road)
    with pytest.raises(ValueError, match="road must be RoadProbabilities"):
        road_lerf(torch.rand(2), torch.rand(2, 2, 3))
    with pytest.raises(ValueError, match="p must lie in"):
        road_combined(torch.tensor([0.5, 1.5]), road)
    with pytest.raises(ValueError, match="road_probabilities must lie in"):
        road_morf(torch.rand(2), RoadProbabilities(torch.rand(2, 2, 3) + 1, (10, 20, 30)))
    with pytest.raises(ValueError, match="shapes differ"):
        arcc(torch.rand(2), torch.rand(3), torch.rand(2))
    with pytest.raises(ValueError, match="coherency must lie in"):
        arcc(torch.rand(2), torch.tensor([0.5, 1.5]), torch.rand(2))


# --- against pytorch-grad-cam -----------------------------------------------------------------------------------

def _small_net(classes=5):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, classes)).eval()


def test_road_is_pytorch_grad_cams_with_its_percentiles_mapped(noiseless_reference):
    """Its ``percentile`` p keeps the pixels below numpy's p-th percentile of the map: it removes the pixels at or
    above, 1 + floor((100 - p) (n - 1) / 100) of n distinct values, which is our floor(k n / 100) for k = 100 - p
    when n is a multiple of 100 (here 20 x 20). Its ``ClassifierOutputSoftmaxTarget`` reads our softmax."""
    size, model = 20, _small_net()
    images = torch.randn(3, 3, size, size)
    maps = torch.stack([torch.randperm(size * size).float().view(size, size) / (size * size - 1) for _ in range(3)])
    classes = torch.tensor([0, 3, 4])
    with torch.no_grad():
        p = target_probabilities(model(images), classes)
    ours = road_probabilities(model, images, maps, classes, noise=0)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    percentiles = [100 - k for k in ROAD_PERCENTAGES]
    for k, percentile in zip(ROAD_PERCENTAGES, percentiles, strict=True):
        threshold = np.percentile(maps[0].numpy(), percentile)
        assert (maps[0].numpy() >= threshold).sum() == k * size * size // 100
    morf = reference_road.ROADMostRelevantFirstAverage(percentiles)(images, maps.numpy(), targets, model)
    lerf = reference_road.ROADLeastRelevantFirstAverage(percentiles)(images, maps.numpy(), targets, model)
    combined = reference_road.ROADCombined(percentiles)(images, maps.numpy(), targets, model)
    torch.testing.assert_close(road_morf(p, ours), torch.from_numpy(morf), atol=1e-5, rtol=0)
    torch.testing.assert_close(road_lerf(p, ours), torch.from_numpy(lerf), atol=1e-5, rtol=0)
    torch.testing.assert_close(road_combined(p, ours), torch.from_numpy(combined), atol=1e-5, rtol=0)
    assert road_morf(p, ours).abs().max() > 1e-3  # the model does react


def test_arcc_is_pytorch_grad_cams_formula_on_shared_terms():
    road = torch.tensor([-0.2, 0.0, 0.1, 0.25, 0.4, 0.5])
    coh = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 1.0])
    com = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.0])
    scaled = (2 * road).clamp(0, 1)
    expected = 3 * (1 / (coh + 1e-8) + 1 / ((1 - com) + 1e-8) + 1 / (scaled + 1e-8)) ** -1  # its ARCC.__call__
    torch.testing.assert_close(arcc(road, coh, com), expected, atol=1e-6, rtol=0)
    assert arcc(road, coh, com)[0] == 0 and arcc(road, coh, com)[1] == 0  # a ROAD <= 0 gives 0 (theirs ~3e-8)
    assert arcc(road, coh, com)[-1] == pytest.approx(1.0)


class FixedMaps:
    """A base method for pytorch-grad-cam's ``Coherency`` that returns given maps, whatever it is asked."""

    def __init__(self, maps):
        self.maps = maps

    def __call__(self, input_tensor, targets):
        return self.maps


def test_arcc_is_pytorch_grad_cams_given_the_maps_of_the_masked_images(noiseless_reference):
    """End to end with its default ROAD percentiles (20, 40, 60, 80: it removes 80, 60, 40, 20 %, the same set).
    Its coherency explains the normalised input multiplied by the map, ours the image masked in pixel space
    (``mask_images``): both are given the same maps of the masked images here."""
    images, maps = left_checkerboard(3, 20)
    maps_of_masked = (maps + 0.3 * torch.rand_like(maps)).clamp(0, 1)
    classes = torch.zeros(3, dtype=torch.long)
    model = LeftCheckerboard()
    p = target_probabilities(model(images), classes)
    road = road_probabilities(model, images, maps, classes, percentages=(20, 40, 60, 80), noise=0)
    ours = arcc_of_maps(p, road, maps, maps_of_masked)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    theirs = reference_arcc.ARCC(FixedMaps(maps_of_masked.numpy()))(images, maps.numpy(), targets, model)
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float(), atol=1e-5, rtol=0)
    assert (ours > 0.1).all()
    expected = arcc(road_combined(p, road), coherency(maps, maps_of_masked), complexity(maps))
    torch.testing.assert_close(ours, expected)


# --- the registry and the harness -------------------------------------------------------------------------------

def test_the_declarations():
    assert list(METRICS)[list(METRICS).index("ADCC") + 1:][:4] == list(KEYS)
    directions = {"ROAD-MoRF": False, "ROAD-LeRF": True, "ROAD": True, "ARCC": True}
    for key in KEYS:
        metric = METRICS[key]
        assert (metric.table, metric.group, metric.by_default, metric.percent) == ("faithfulness", "road", False, True)
        assert metric.higher_is_better == directions[key]
    assert [METRICS[key].index_type for key in KEYS] == ["road_morf", "road_lerf", "road", "arcc"]
    assert METRICS["ARCC"].needs == ("p", "road", "maps", "maps_of_masked")
    assert "road" in COMPUTED_INPUTS and not COMPUTED_INPUTS["road"].explains
    assert "road" in metric_groups() and "road" not in metric_groups(by_default=True)


def test_measure_computes_the_road_input_and_the_four_metrics():
    model = _small_net(3)
    images, maps, classes = torch.randn(2, 3, 12, 12), torch.rand(2, 12, 12), torch.tensor([1, 2])
    with torch.no_grad():
        p = target_probabilities(model(images), classes)
    values, inputs = measure(model, images, maps, classes, [METRICS[key] for key in KEYS], {"p": p}, "gradcam",
                             {"layer": "0"})
    assert set(values) == set(KEYS) and all(value.shape == (2,) for value in values.values())
    road = road_probabilities(model, images, maps, classes)  # seed 0, as the harness
    torch.testing.assert_close(inputs["road"].probabilities, road.probabilities)
    torch.testing.assert_close(values["ROAD"], road_combined(p, road))


def test_a_run_with_metrics_road_reports_the_four(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST[:2])
    run_dir, results = run(tmp_path, "resnet18", "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                           "--methods", "gradcam", "box", "--metrics", "road")
    assert set(KEYS) <= set(results["methods"]["gradcam"])
    assert set(KEYS[:3]) <= set(results["methods"]["box"]) and "ARCC" not in results["methods"]["box"]  # cannot
    gradcam = results["methods"]["gradcam"]
    assert -100 <= gradcam["ROAD-MoRF"] <= 100 and -50 <= gradcam["ROAD"] <= 50 and 0 <= gradcam["ARCC"] <= 100
    assert gradcam["ROAD"] == pytest.approx((gradcam["ROAD-LeRF"] - gradcam["ROAD-MoRF"]) / 2, abs=1e-4)
    assert "| ROAD-MoRF↓ | ROAD-LeRF↑ | ROAD↑ | ARCC↑ |" in (run_dir / "results.md").read_text()
