"""Faithfulness metrics (AD, AG, AI, ADCC) against values computed by hand and against pytorch-grad-cam,
torchcam and scipy where their definitions coincide with ours."""

import importlib
from functools import partial

import numpy as np
import pytest
import torch
from references import MapsAsCAM
from scipy import stats
from torch import nn

from zoo.evaluation.metrics.adcc import adcc, adcc_of_maps, coherency, complexity
from zoo.evaluation.metrics.faithfulness import increased, relative_drop, relative_gain
from zoo.evaluation.saliency import mask_images
from zoo.metrics import METRICS, reported_value

ON_IMAGE = torch.tensor([0.5, 0.8, 0.2, 0.4])
ON_MASKED = torch.tensor([0.25, 0.8, 0.6, 0.1])


def test_average_drop_by_hand():
    # drops: 0.25/0.5 = 0.5, 0, 0 (a gain), 0.3/0.4 = 0.75 -> mean 0.3125
    drops = relative_drop(ON_IMAGE, ON_MASKED)
    torch.testing.assert_close(drops, torch.tensor([0.5, 0.0, 0.0, 0.75]))
    assert reported_value(METRICS["AD"], drops) == pytest.approx(31.25)


def test_average_gain_by_hand():
    # gains: 0, 0, 0.4/0.8 = 0.5, 0 -> mean 0.125
    gains = relative_gain(ON_IMAGE, ON_MASKED)
    torch.testing.assert_close(gains, torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert reported_value(METRICS["AG"], gains) == pytest.approx(12.5)


def test_average_increase_is_strict():
    # only the third image increases; equal probabilities do not count
    increases = increased(ON_IMAGE, ON_MASKED)
    torch.testing.assert_close(increases, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert reported_value(METRICS["AI"], increases) == pytest.approx(25.0)


def test_certain_image_cannot_gain_and_gives_no_nan():
    # p = 1: AG's denominator 1 - p is 0; the image contributes 0 (o <= 1 = p leaves no room to gain)
    p, o = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.75])
    torch.testing.assert_close(relative_gain(p, o), torch.tensor([0.0, 0.5]))  # 0.25 / 0.5
    torch.testing.assert_close(relative_gain(torch.ones(3), torch.full((3,), 0.3)), torch.zeros(3))
    torch.testing.assert_close(relative_drop(torch.ones(2), torch.tensor([0.0, 1.0])), torch.tensor([1.0, 0.0]))


def test_impossible_image_cannot_drop_and_gives_no_nan():
    # p = 0 (a softmax that underflowed): AD's denominator is 0; the image contributes 0
    torch.testing.assert_close(relative_drop(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0])),
                               torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(relative_gain(torch.tensor([0.0]), torch.tensor([0.5])), torch.tensor([0.5]))


@pytest.mark.parametrize("per_image", [relative_drop, relative_gain, increased])
def test_unchanged_probabilities_give_no_drop_gain_or_increase(per_image):
    p = torch.tensor([0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(per_image(p, p.clone()), torch.zeros(4))


@pytest.mark.parametrize("per_image", [relative_drop, relative_gain, increased])
def test_bad_probabilities_are_named(per_image):
    with pytest.raises(ValueError, match="shapes differ"):
        per_image(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        per_image(torch.tensor([0.5, float("nan")]), torch.rand(2))
    with pytest.raises(ValueError, match=r"o must lie in \[0, 1\]"):
        per_image(torch.rand(2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        per_image(torch.tensor([-0.1, 0.5]), torch.rand(2))
    with pytest.raises(ValueError, match="empty"):
        per_image(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="float tensor"):
        per_image(torch.tensor([0, 1]), torch.tensor([1, 1]))


# --- ADCC: coherency, complexity and their harmonic mean with the drop ---------------------------------

def test_coherency_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # Pearson r of (1, 2, 3, 4) and (1, 3, 2, 4): centred (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5),
    # sum of products 4, sums of squares 5 and 5 -> r = 0.8 -> coherency (0.8 + 1) / 2 = 0.9
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    maps = torch.stack([a, a, a])
    others = torch.stack([b, 3 * a + 7, 5 - a])  # r = 0.8, r = 1 (affine), r = -1
    torch.testing.assert_close(coherency(maps, others), torch.tensor([0.9, 1.0, 0.0]))


def test_coherency_of_constant_maps_follows_the_convention():
    varying = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    zeros, ones = torch.zeros(2, 2), torch.ones(2, 2)
    almost = torch.full((2, 2), 0.3) + torch.tensor([[0.0, 1e-8], [0.0, 0.0]])  # constant up to rounding
    maps = torch.stack([zeros, zeros, ones, varying, almost])
    others = torch.stack([zeros, ones, varying, zeros, varying])
    # two constant maps: r = 1; one constant: r = 0 -> 0.5; never NaN
    torch.testing.assert_close(coherency(maps, others), torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5]))


def test_coherency_matches_scipy_pearson():
    maps, others = torch.rand(4, 9, 7), torch.rand(4, 9, 7)
    others[1] = maps[1] * 0.5 + 0.1 * others[1]  # strongly correlated
    expected = [(stats.pearsonr(a.ravel().numpy(), b.ravel().numpy())[0] + 1) / 2
                for a, b in zip(maps, others, strict=True)]
    torch.testing.assert_close(coherency(maps, others), torch.tensor(expected, dtype=torch.float32),
                               atol=1e-6, rtol=1e-6)


def test_complexity_by_hand():
    peak = torch.zeros(4, 4)
    peak[1, 2] = 1.0
    maps = torch.stack([torch.zeros(4, 4), torch.ones(4, 4), peak, torch.full((4, 4), 0.25)])
    # L1 norm over the 16 pixels: 0, 16, 1, 4 -> divided by 16
    torch.testing.assert_close(complexity(maps), torch.tensor([0.0, 1.0, 1 / 16, 0.25]))


def test_adcc_by_hand():
    drop = torch.tensor([0.5, 0.0, 0.2, 1.0, 0.3])
    coh = torch.tensor([0.5, 1.0, 0.9, 0.8, 0.0])
    com = torch.tensor([0.5, 0.0, 0.25, 0.1, 0.2])
    # terms (coherency, 1 - complexity, 1 - drop): (.5, .5, .5) -> .5; (1, 1, 1) -> 1;
    # (.9, .75, .8) -> 3 / (1/.9 + 1/.75 + 1/.8); a zero term -> 0 (the limit, not NaN)
    expected = torch.tensor([0.5, 1.0, 3 / (1 / 0.9 + 1 / 0.75 + 1 / 0.8), 0.0, 0.0])
    torch.testing.assert_close(adcc(drop, coh, com), expected)


def test_adcc_end_to_end_on_an_all_zero_map():
    # the all-zero map masks the image to black: complexity 0; a method that then returns zeros again is
    # perfectly coherent; ADCC is decided by the drop
    zeros = torch.zeros(1, 5, 5)
    p, o = torch.tensor([0.8]), torch.tensor([0.2])
    drop = relative_drop(p, o)  # 0.75
    score = adcc(drop, coherency(zeros, zeros), complexity(zeros))
    torch.testing.assert_close(score, torch.tensor([3 / (1 + 1 + 4)]))


def test_bad_adcc_inputs_are_named():
    with pytest.raises(ValueError, match="shapes differ"):
        coherency(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match=r"maps must be a float tensor of maps \[N, H, W\]"):
        complexity(torch.rand(4, 4))
    with pytest.raises(ValueError, match="maps_of_masked holds NaN or Inf"):
        coherency(torch.rand(1, 2, 2), torch.tensor([[[0.0, float("inf")], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match=r"coherency must lie in \[0, 1\]"):
        adcc(torch.rand(2), torch.tensor([0.5, -0.5]), torch.rand(2))
    with pytest.raises(ValueError, match="shapes differ"):
        adcc(torch.rand(2), torch.rand(3), torch.rand(2))


# --- cross-checks with independent implementations ------------------------------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class OnPixels(nn.Module):
    """A classifier of normalised images seen as one of [0, 1] pixels: the normalisation happens inside."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels):
        return self.net((pixels - MEAN) / STD)


def _setting(count=6, size=12, classes=5):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, classes)).eval()
    pixels = torch.rand(count, 3, size, size)
    maps = torch.rand(count, size, size)
    maps[0] = 1.0  # the map that keeps the whole image: o = p exactly, which AI must not count
    targets = torch.arange(count) % classes
    return net, pixels, maps, targets


def _target_probability(model, x, targets):
    with torch.no_grad():
        return model(x).softmax(1).gather(1, targets[:, None]).squeeze(1)


def test_pixel_space_masking_of_normalised_images_is_masking_of_pixels():
    # ours: undo the normalisation, multiply, normalise again; the same as multiplying raw pixels
    net, pixels, maps, targets = _setting()
    normalised = (pixels - MEAN) / STD
    o_ours = _target_probability(net, mask_images(normalised, maps, MEAN, STD), targets)
    o_pixels = _target_probability(OnPixels(net), pixels * maps[:, None], targets)
    torch.testing.assert_close(o_ours, o_pixels, atol=1e-6, rtol=1e-5)


def test_drop_and_increase_match_pytorch_grad_cam():
    """pytorch-grad-cam's DropInConfidence gives the absolute drop [p - o]_+ per image (ours divides by p) and
    IncreaseInConfidence 1[o - p > 0] (strict, as ours); both multiply the tensor they are given by the map,
    so they are given raw pixels and a model that normalises inside, which is our pixel-space masking.
    (Given the normalised tensor, as is usual with that library, they would mask to the mean colour.)"""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, pixels, maps, targets = _setting()
    model = OnPixels(net)
    p = _target_probability(model, pixels, targets)
    o = _target_probability(model, pixels * maps[:, None], targets)
    their_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    drops = DropInConfidence()(pixels, maps.numpy(), their_targets, model)
    increases = IncreaseInConfidence()(pixels, maps.numpy(), their_targets, model)
    assert p[0] == o[0]  # the all-ones map, counted by neither AI
    torch.testing.assert_close(relative_drop(p, o), torch.from_numpy(drops).float() / p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(increased(p, o), torch.from_numpy(increases))
    assert 0 < increased(p, o).sum() < len(p)  # a case where strictness and both outcomes are exercised


def test_drop_and_increase_match_torchcam():
    """torchcam's ClassificationMetric: mean [p - o]_+ / (p + 1e-7) as a fraction, and strict 1[p < o];
    it multiplies its input tensor by the map, so again raw pixels and a model that normalises inside."""
    metrics = importlib.import_module("torchcam.metrics")
    net, pixels, maps, targets = _setting()
    model = OnPixels(net)
    p = _target_probability(model, pixels, targets)
    o = _target_probability(model, pixels * maps[:, None], targets)
    metric = metrics.ClassificationMetric(MapsAsCAM(model, maps), partial(torch.softmax, dim=-1))
    metric.update(pixels, class_idx=[int(t) for t in targets])
    summary = metric.summary()
    assert reported_value(METRICS["AD"], relative_drop(p, o)) == pytest.approx(100 * summary["avg_drop"], rel=1e-5)
    assert reported_value(METRICS["AI"], increased(p, o)) == pytest.approx(100 * summary["conf_increase"])


def test_adcc_matches_the_official_formulas_on_random_maps():
    """Poppi et al.'s official code: coherency (pearsonr + 1) / 2, complexity |map|.sum() / (H * W), drop
    max(0, p - o) / p. (Their code takes p as the top-1 probability; ours is the target's, which is the
    same when the target is the predicted class.)"""
    maps, others = torch.rand(3, 6, 6), torch.rand(3, 6, 6)
    p, o = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.3, 0.7, 0.1])
    coh = np.array([(stats.pearsonr(a.ravel().numpy(), b.ravel().numpy())[0] + 1) / 2
                    for a, b in zip(maps, others, strict=True)])
    com = np.abs(maps.numpy()).sum((1, 2)) / 36
    drop = np.maximum(0, p.numpy() - o.numpy()) / p.numpy()
    expected = 3 / (1 / coh + 1 / (1 - com) + 1 / (1 - drop))
    ours = adcc(relative_drop(p, o), coherency(maps, others), complexity(maps))
    torch.testing.assert_close(ours, torch.from_numpy(expected).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adcc_of_maps(p, o, maps, others), ours)  # the per-image function ADCC reports
