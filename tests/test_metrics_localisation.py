"""Localisation metrics (eq. 1.16-1.22) against values computed by hand and independent implementations."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from zoo.evaluation.metrics.localisation import (
    box_accuracy,
    energy_pointing_game,
    localisation_error,
    max_box_accuracy,
    official_metric,
    pixel_f1,
    pixel_precision,
    pixel_recall,
    pointing_game,
    predicted_boxes,
    saliency_metric,
)


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float)


def box_mask(h, w, gt):
    """The union of integer boxes (exclusive x1, y1) as a mask, by slicing: independent of the library."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in gt.long().tolist():
        mask[y0:y1, x0:x1] = True
    return mask


def smooth_maps(n, size=32, cells=5):
    """Random maps shaped like upsampled CAMs, min-max normalised."""
    maps = F.interpolate(torch.rand(n, 1, cells, cells), size=size, mode="bilinear")[:, 0]
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    return (maps - low) / (high - low)


# ---- predicted box B_p: mean threshold, largest 8-connected component --------------------------------------


def test_single_peak_gives_its_pixel():
    maps = torch.zeros(1, 5, 6)
    maps[0, 2, 3] = 1
    torch.testing.assert_close(predicted_boxes(maps), boxes([3, 2, 4, 3]))


def test_largest_of_two_blobs_is_chosen():
    maps = torch.zeros(1, 8, 8)
    maps[0, 0:2, 0:2] = 1  # 4 pixels, first in raster order
    maps[0, 4:7, 3:6] = 0.6  # 9 pixels, weaker but larger
    torch.testing.assert_close(predicted_boxes(maps), boxes([3, 4, 6, 7]))


def test_equally_large_components_tie_to_the_first_in_raster_order():
    maps = torch.zeros(1, 6, 6)
    maps[0, 3:5, 0:2] = 1
    maps[0, 0:2, 4:6] = 1  # starts on an earlier row
    torch.testing.assert_close(predicted_boxes(maps), boxes([4, 0, 6, 2]))


def test_diagonal_neighbours_are_connected():
    # 8-connectivity: a diagonal staircase of 4 pixels beats a 3-pixel bar; with 4-connectivity the bar would win
    maps = torch.zeros(1, 6, 6)
    for i in range(4):
        maps[0, i, i] = 1
    maps[0, 5, 0:3] = 1
    torch.testing.assert_close(predicted_boxes(maps), boxes([0, 0, 4, 4]))


def test_long_winding_component_is_one():
    # a serpentine: rows joined at alternating ends, one component however long the path
    mask = torch.zeros(1, 9, 7, dtype=torch.bool)
    mask[0, ::2] = True
    for row in range(1, 9, 2):
        mask[0, row, 6 if row % 4 == 1 else 0] = True
    torch.testing.assert_close(predicted_boxes(mask.float()), boxes([0, 0, 7, 9]))


def test_blob_at_the_border_reaches_it():
    maps = torch.zeros(2, 5, 7)
    maps[0, 3:, 4:] = 1  # bottom-right corner
    maps[1, :2, :3] = 1  # top-left corner
    torch.testing.assert_close(predicted_boxes(maps), boxes([4, 3, 7, 5], [0, 0, 3, 2]))


def test_all_zero_and_constant_maps_give_the_empty_box():
    maps = torch.stack([torch.zeros(4, 5), torch.full((4, 5), 0.3), torch.ones(4, 5)])
    torch.testing.assert_close(predicted_boxes(maps), torch.zeros(3, 4))


def test_fake_cam_gives_the_whole_image():
    # ones with a zero at the top-left pixel (thesis §2.4): all other pixels are above the mean
    maps = torch.ones(1, 6, 5)
    maps[0, 0, 0] = 0
    torch.testing.assert_close(predicted_boxes(maps), boxes([0, 0, 5, 6]))


def test_explicit_threshold_is_strict():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0:3, 0:3] = 0.5
    maps[0, 1, 1] = 0.9
    torch.testing.assert_close(predicted_boxes(maps, threshold=0.5), boxes([1, 1, 2, 2]))
    torch.testing.assert_close(predicted_boxes(maps, threshold=0.4), boxes([0, 0, 3, 3]))


def test_components_agree_with_scipy():
    ndimage = importlib.import_module("scipy.ndimage")
    import numpy as np

    maps = torch.cat([smooth_maps(16), smooth_maps(8, cells=12), torch.rand(8, 32, 32)])
    masks = maps > maps.mean((1, 2), keepdim=True)
    expected = []
    for mask in masks.numpy():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connectivity
        sizes = np.bincount(labels.ravel())[1:]
        ys, xs = np.nonzero(labels == np.argmax(sizes) + 1)  # scipy numbers components in raster order
        expected.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    torch.testing.assert_close(predicted_boxes(maps), torch.tensor(expected, dtype=torch.float))


# ---- OM, LE: IoU with the ground truth --------------------------------------------------------------------


def square_map(x0, y0, x1, y1, h=8, w=8):
    maps = torch.zeros(1, h, w)
    maps[0, y0:y1, x0:x1] = 1
    return maps


def test_localisation_error_by_hand():
    maps = square_map(0, 0, 4, 4)  # B_p = (0, 0, 4, 4)
    # intersection 2x4 = 8, union 16 + 16 - 8 = 24: IoU 1/3
    torch.testing.assert_close(localisation_error(maps, [boxes([2, 0, 6, 4])]), torch.tensor([2 / 3]))
    torch.testing.assert_close(localisation_error(maps, [boxes([0, 0, 4, 4])]), torch.tensor([0.0]))
    torch.testing.assert_close(localisation_error(maps, [boxes([4, 4, 8, 8])]), torch.tensor([1.0]))


def test_localisation_error_takes_the_best_of_two_boxes():
    maps = square_map(0, 0, 4, 4)
    gt = boxes([4, 4, 8, 8], [0, 0, 4, 2])  # IoU 0 and 8/16
    torch.testing.assert_close(localisation_error(maps, [gt]), torch.tensor([0.5]))


def test_localisation_error_of_an_all_zero_map_is_1():
    torch.testing.assert_close(localisation_error(torch.zeros(1, 8, 8), [boxes([0, 0, 8, 8])]), torch.tensor([1.0]))


def test_localisation_error_matches_torchvision_box_iou():
    maps = smooth_maps(12)
    gt = [torch.tensor([[x, y, x + 5 + 2 * x, y + 7 + y], [20, 3, 31, 29]], dtype=torch.float)
          for x, y in zip(torch.randint(0, 10, (12,)).tolist(), torch.randint(0, 10, (12,)).tolist(), strict=True)]
    pred = predicted_boxes(maps)
    expected = torch.stack([1 - box_iou(p[None], g).amax() for p, g in zip(pred, gt, strict=True)])
    torch.testing.assert_close(localisation_error(maps, gt), expected)


def test_official_metric_needs_a_correct_prediction():
    maps = torch.cat([square_map(0, 0, 4, 4), square_map(0, 0, 4, 4)])
    gt = [boxes([2, 0, 6, 4])] * 2
    om = official_metric(maps, gt, predictions=torch.tensor([7, 3]), labels=torch.tensor([7, 5]))
    torch.testing.assert_close(om, torch.tensor([2 / 3, 1.0]))  # right class: LE; wrong class: 1


# ---- pixel-wise precision (= energy pointing game), recall, F1 ---------------------------------------------


def test_precision_recall_f1_by_hand():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0:2, 0:2] = 1
    maps[0, 3, 3] = 0.5
    gt = [boxes([0, 0, 2, 2])]
    p, r = 4 / 4.5, 4 / 4
    torch.testing.assert_close(pixel_precision(maps, gt), torch.tensor([p]))
    torch.testing.assert_close(energy_pointing_game(maps, gt), torch.tensor([p]))
    torch.testing.assert_close(pixel_recall(maps, gt), torch.tensor([r]))
    torch.testing.assert_close(pixel_f1(maps, gt), torch.tensor([2 * p * r / (p + r)]))


def test_two_overlapping_boxes_count_their_union_once():
    maps = torch.full((1, 4, 4), 0.5)
    gt = [boxes([0, 0, 2, 2], [1, 1, 3, 3])]  # union: 4 + 4 - 1 = 7 pixels
    torch.testing.assert_close(pixel_precision(maps, gt), torch.tensor([7 / 16]))
    torch.testing.assert_close(pixel_recall(maps, gt), torch.tensor([0.5]))


def test_box_at_the_border_and_float_box():
    maps = torch.zeros(2, 3, 4)
    maps[:, :, 3] = 1  # last column
    gt = [boxes([3, 0, 4, 3]), boxes([2.6, 0, 3.6, 3])]  # x1 = W; a float box holding column 3's centres only
    torch.testing.assert_close(pixel_precision(maps, gt), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(pixel_recall(maps, gt), torch.tensor([1.0, 1.0]))


def test_all_zero_map_scores_zero_not_nan():
    maps, gt = torch.zeros(1, 4, 4), [boxes([0, 0, 2, 2])]
    for metric in (pixel_precision, pixel_recall, pixel_f1):
        torch.testing.assert_close(metric(maps, gt), torch.tensor([0.0]))


def test_precision_matches_quantus_relevance_mass_accuracy():
    quantus = importlib.import_module("quantus")
    maps = smooth_maps(6)
    gt = [boxes([2, 3, 17, 20], [10, 12, 30, 32])] * 6
    masks = torch.stack([box_mask(32, 32, g) for g in gt])
    metric = quantus.RelevanceMassAccuracy(disable_warnings=True)
    expected = metric.evaluate_batch(a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy())
    torch.testing.assert_close(pixel_precision(maps, gt), torch.as_tensor(expected))


# ---- standard pointing game --------------------------------------------------------------------------------


def test_pointing_game_by_hand():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1  # peak in the box
    maps[1, 3, 3] = 1  # peak outside
    maps[2, 3, 3] = maps[2, 0, 0] = 1  # tie: one of the maxima in the box is enough
    gt = [boxes([0, 0, 2, 2])] * 3
    torch.testing.assert_close(pointing_game(maps, gt), torch.tensor([1.0, 0.0, 1.0]))


def test_pointing_game_ties_outside_miss_and_constant_map_hits():
    maps = torch.zeros(2, 4, 4)
    maps[0, 3, 3] = maps[0, 3, 0] = 1
    gt = [boxes([0, 0, 2, 2])] * 2
    torch.testing.assert_close(pointing_game(maps, gt), torch.tensor([0.0, 1.0]))


def test_pointing_game_tolerance():
    maps = torch.zeros(1, 6, 6)
    maps[0, 5, 5] = 1
    gt = [boxes([0, 0, 4, 4])]  # nearest box pixel (3, 3): distance sqrt(8)
    torch.testing.assert_close(pointing_game(maps, gt, tolerance=2), torch.tensor([0.0]))
    torch.testing.assert_close(pointing_game(maps, gt, tolerance=3), torch.tensor([1.0]))


def test_pointing_game_matches_quantus():
    quantus = importlib.import_module("quantus")
    maps = torch.cat([smooth_maps(8), (smooth_maps(8) * 3).round() / 3])  # the second half has many ties
    gt = [boxes([1, 1, 9, 9], [20, 5, 32, 16]), boxes([0, 16, 32, 32])] * 8
    masks = torch.stack([box_mask(32, 32, g) for g in gt])
    expected = quantus.PointingGame(disable_warnings=True).evaluate_batch(
        a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy())
    torch.testing.assert_close(pointing_game(maps, gt), torch.as_tensor(expected, dtype=torch.float))


# ---- BoxAcc ------------------------------------------------------------------------------------------------


def test_box_accuracy_by_hand():
    maps = torch.zeros(1, 8, 8)
    maps[0, 0:4, 0:4] = 0.4
    maps[0, 1:3, 1:3] = 1.0
    gt = [boxes([0, 0, 4, 4])]
    # eta 0.2: box (0, 0, 4, 4), IoU 1; eta 0.6: box (1, 1, 3, 3), IoU 4/16; eta 1: empty, IoU 0
    hits = box_accuracy(maps, gt, thresholds=(0.2, 0.6, 1.0), ious=(0.25, 0.5))
    torch.testing.assert_close(hits, torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]))


def test_max_box_accuracy_takes_the_best_threshold_per_iou_then_averages():
    hits = torch.tensor([[[1.0, 1.0], [0.0, 1.0]],   # image 1: [threshold, iou]
                         [[0.0, 0.0], [1.0, 0.0]]])      # image 2
    # per threshold means: [[.5, .5], [.5, .5]] -> best per iou: [.5, .5] -> .5
    torch.testing.assert_close(max_box_accuracy(hits), torch.tensor(0.5))
    hits[1, 0, 1] = 1  # threshold 0 now catches both at the second iou
    torch.testing.assert_close(max_box_accuracy(hits), torch.tensor(0.75))


def test_box_accuracy_agrees_with_predicted_boxes_at_each_threshold():
    maps, gt = smooth_maps(4), [boxes([4, 4, 24, 20])] * 4
    thresholds = (0.1, 0.5, 0.8)
    hits = box_accuracy(maps, gt, thresholds, ious=(0.5,))
    for t, eta in enumerate(thresholds):
        iou = box_iou(predicted_boxes(maps, eta), gt[0])[:, 0]
        torch.testing.assert_close(hits[:, t, 0], (iou >= 0.5).float())


# ---- Saliency Metric ---------------------------------------------------------------------------------------


def test_saliency_metric_by_hand():
    maps = torch.zeros(3, 10, 10)
    maps[0, 0:5, 0:4] = 1  # box area 20 / 100
    maps[1, 0, 0] = 1  # area 1 / 100, below the 0.05 floor
    probs = torch.tensor([1.0, 0.5, 0.25])  # the all-zero third map: empty box, the floor again
    expected = torch.tensor([math.log(0.2), math.log(0.05) - math.log(0.5), math.log(0.05) - math.log(0.25)])
    torch.testing.assert_close(saliency_metric(maps, probs), expected)


# ---- inputs ------------------------------------------------------------------------------------------------


def test_torchvision_bounding_boxes_feed_directly():
    image = tv_tensors.Image(torch.zeros(3, 10, 20))
    gt = tv_tensors.BoundingBoxes([[0, 0, 10, 5]], format="XYXY", canvas_size=(10, 20))
    image, gt = v2.Compose([v2.Resize((20, 40)), v2.RandomHorizontalFlip(p=1.0)])(image, gt)  # -> (20, 0, 40, 10)
    maps = torch.zeros(1, 20, 40)
    maps[0, 0:10, 20:40] = 1
    torch.testing.assert_close(localisation_error(maps, [gt]), torch.tensor([0.0]))
    torch.testing.assert_close(pixel_recall(maps, [gt]), torch.tensor([1.0]))


@pytest.mark.parametrize("maps, gt, message", [
    (torch.zeros(1, 1, 8, 8), [boxes([0, 0, 2, 2])], r"\[N, H, W\]"),
    (torch.full((1, 8, 8), float("nan")), [boxes([0, 0, 2, 2])], "NaN"),
    (torch.full((1, 8, 8), 2.0), [boxes([0, 0, 2, 2])], r"\[0, 1\]"),
    (torch.zeros(2, 8, 8), [boxes([0, 0, 2, 2])], "sequence of 2"),
    (torch.zeros(1, 8, 8), [torch.zeros(0, 4)], "n_i >= 1"),
    (torch.zeros(1, 8, 8), [boxes([0, 0, 9, 2])], "outside"),
    (torch.zeros(1, 8, 8), [boxes([-1, 0, 2, 2])], "outside"),
    (torch.zeros(1, 8, 8), [boxes([3, 0, 3, 2])], "empty box"),
    (torch.zeros(1, 8, 8), [boxes([0, 5, 2, 2])], "empty box"),
    (torch.zeros(1, 8, 8), [tv_tensors.BoundingBoxes([[0, 0, 2, 2]], format="XYXY", canvas_size=(16, 16))],
     "8x8 but"),
    (torch.zeros(1, 8, 8), [tv_tensors.BoundingBoxes([[0, 0, 2, 2]], format="XYWH", canvas_size=(8, 8))], "XYWH"),
])
def test_bad_maps_and_boxes_are_named(maps, gt, message):
    for metric in (localisation_error, pixel_precision, pointing_game, box_accuracy):
        with pytest.raises(ValueError, match=message):
            metric(maps, gt)


def test_bad_probabilities_and_class_ids_are_named():
    maps, gt = torch.zeros(2, 8, 8), [boxes([0, 0, 2, 2])] * 2
    for probs in (torch.tensor([0.5, 0.0]), torch.tensor([0.5, 1.5])):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            saliency_metric(maps, probs)
    with pytest.raises(ValueError, match="non-negative"):
        official_metric(maps, gt, torch.tensor([1, -1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        official_metric(maps, gt, torch.tensor([1, 1]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="thresholds"):
        box_accuracy(maps, gt, thresholds=(0.5, 1.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_matches_cpu():
    maps, gt = smooth_maps(8), [boxes([2, 3, 17, 20])] * 8
    for metric in (localisation_error, pixel_f1, pointing_game, box_accuracy):
        torch.testing.assert_close(metric(maps.cuda(), gt).cpu(), metric(maps, gt))
