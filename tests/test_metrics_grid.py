"""The grid pointing game (grid_layout, tile, grid_pointing_game, the harness' ``--metrics grid``, grid_dataset) by
hand and on a model whose Grad-CAM maps are known exactly; relevance rank accuracy by hand and against Quantus, and
relevance mass accuracy as the energy pointing game."""

import importlib
import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_harness import photo_folder
from timm.data import resolve_data_config
from timm.models import save_for_hf
from torch import nn

from zoo.data import dataset_images
from zoo.evaluation.harness import explains_again, main, measure, metric_groups
from zoo.evaluation.metrics.grid import (
    GRID_SIZE,
    MIN_CONFIDENCE,
    GridExplanations,
    explained_grids,
    grid_dataset,
    grid_layout,
    grid_pointing_game,
    grid_seed,
    tile,
)
from zoo.evaluation.metrics.inputs import COMPUTED_INPUTS, Explanations
from zoo.evaluation.metrics.localisation import energy_pointing_game, relevance_rank_accuracy
from zoo.evaluation.saliency import explain
from zoo.metrics import METRICS

# ---- a model whose Grad-CAM maps are known: class c is colour c --------------------------------------------------

COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])


def colour_net() -> nn.Module:
    """Class c's logit: 10 x the share of the image in colour c (a 1x1 convolution matching the colours exactly, a
    ReLU, global average pooling), so Grad-CAM of class c at the ReLU ("layer": "1") is the pixels of colour c."""
    match = nn.Conv2d(3, 4, 1, bias=False)
    head = nn.Linear(4, 4)
    with torch.no_grad():
        match.weight.copy_((COLOURS / COLOURS.square().sum(1, keepdim=True))[..., None, None])
        head.weight.copy_(10 * torch.eye(4))
        head.bias.zero_()
    return nn.Sequential(match, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def colour_images(classes, size: int = 8) -> torch.Tensor:
    """Images [N, 3, size, size] in their class's colour."""
    return COLOURS[torch.as_tensor(classes)][..., None, None].expand(-1, 3, size, size).clone()


def shared_inputs(model, images, classes):
    with torch.no_grad():
        logits = model(images)
    return {"p": logits.softmax(1).gather(1, classes[:, None]).squeeze(1), "labels": classes,
            "predictions": logits.argmax(1)}


# ---- grid_layout ---------------------------------------------------------------------------------------------


def layout_of(classes, p=None, predictions=None, labels=None, n=2, seed=0, **options):
    classes = torch.as_tensor(classes)
    p = torch.full(classes.shape, 0.9) if p is None else torch.as_tensor(p)
    predictions = classes if predictions is None else torch.as_tensor(predictions)
    return grid_layout(classes, p, predictions, labels, n, generator=torch.Generator().manual_seed(seed), **options)


def test_layout_by_hand():
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 5, 5, 5])
    p = torch.full((12,), 0.9)
    p[3] = 0.4  # not confident: out
    p[6] = 0.5  # the threshold is strict, as B-cos': out
    predictions = classes.clone()
    predictions[4] = 2  # wrong: out
    labels = classes.clone()
    labels[7] = 0  # the explained class 2 is not its label: out
    layout = grid_layout(classes, p, predictions, labels, 2, generator=torch.Generator().manual_seed(0))
    # left: 0 {0, 5}, 1 {1}, 2 {2}, 3 {8}, 5 {9, 10, 11}: one grid; two would need 8 rows with at most 2 of a
    # class, and there are 2 + 1 + 1 + 1 + 2 = 7
    assert layout.shape == (1, 4) and layout.dtype == torch.long
    assert set(layout.flatten().tolist()) <= {0, 1, 2, 5, 8, 9, 10, 11}
    assert all(len(set(classes[grid].tolist())) == 4 for grid in layout)
    assert grid_layout(classes, p, predictions, labels, 3).shape == (0, 9)  # 5 classes: no 3x3 grid
    p[6] = 0.51  # now 1 {1, 6}: two grids
    layout = grid_layout(classes, p, predictions, labels, 2, generator=torch.Generator().manual_seed(0))
    assert layout.shape == (2, 4) and set(layout.flatten().tolist()) <= {0, 1, 2, 5, 6, 8, 9, 10, 11}
    assert all(len(set(classes[grid].tolist())) == 4 for grid in layout)


@pytest.mark.parametrize("counts, grids", [((2, 2, 2, 2), 2), ((3, 1, 1, 1, 1), 1), ((4, 4, 1, 1, 1, 1), 2),
                                           ((5, 5, 5), 0), ((1,) * 9, 2)])
def test_layout_makes_as_many_grids_as_the_classes_allow(counts, grids):
    classes = torch.cat([torch.full((count,), c) for c, count in enumerate(counts)])
    assert len(layout_of(classes)) == grids


def test_layout_rules_hold_and_the_seed_decides():
    torch.manual_seed(1)
    classes = torch.randint(0, 12, (64,))
    p, predictions = torch.rand(64), torch.where(torch.rand(64) < 0.8, classes, (classes + 1) % 12)
    layout = layout_of(classes, p, predictions, n=3, seed=5)
    used = layout.flatten()
    assert len(layout) > 0 and len(used.unique()) == len(used)  # each row in one cell at most
    assert ((predictions[used] == classes[used]) & (p[used] > MIN_CONFIDENCE)).all()
    assert all(len(classes[grid].unique()) == 9 for grid in layout)
    assert torch.equal(layout, layout_of(classes, p, predictions, n=3, seed=5))
    assert not torch.equal(layout, layout_of(classes, p, predictions, n=3, seed=6))
    everything = layout_of(classes, p, predictions, n=3, seed=5, min_confidence=0)
    assert len(everything) >= len(layout)


def test_each_grid_is_placed_at_random():
    classes = torch.arange(4).repeat(2)  # two grids of the same four classes
    placements = [classes[layout_of(classes, seed=seed)] for seed in range(20)]
    assert {int((placed[0] == 0).nonzero()) for placed in placements} == {0, 1, 2, 3}  # class 0 visits every cell
    assert any(not torch.equal(placed[0], placed[1]) for placed in placements)  # the grids' placements differ


@pytest.mark.parametrize("change, message", [
    (dict(n=1), "n .* must be an integer >= 2"),
    (dict(n=2.0), "n .* must be an integer >= 2"),
    (dict(min_confidence=1.0), r"min_confidence must be a probability in \[0, 1\)"),
    (dict(p=torch.tensor([0.9, 1.5, 0.9, 0.9])), r"p must lie in \[0, 1\]"),
    (dict(p=torch.tensor([0.9, 0.9])), "shapes differ|must be an integer tensor"),
    (dict(classes=torch.tensor([0.0, 1, 2, 3])), "classes must be an integer tensor"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must be an integer tensor"),
])
def test_bad_layout_input_is_named(change, message):
    given = dict(classes=torch.arange(4), p=torch.full((4,), 0.9), predictions=torch.arange(4), labels=None, n=2)
    given.update(change)
    with pytest.raises(ValueError, match=message):
        grid_layout(**given)


# ---- tile ----------------------------------------------------------------------------------------------------


def test_cells_land_where_the_layout_says():
    images = torch.arange(4.0)[:, None, None, None].expand(4, 2, 3, 5).clone()  # image i is i; cells 3 x 5
    grids, boxes = tile(images, torch.tensor([[2, 0, 1, 3]]), 2)
    assert grids.shape == (1, 2, 6, 10)
    expected = torch.tensor([[2.0, 0.0], [1.0, 3.0]]).repeat_interleave(3, 0).repeat_interleave(5, 1)
    assert torch.equal(grids[0, 0], expected)  # raster order: top-left, top-right, bottom-left, bottom-right
    assert torch.equal(boxes, torch.tensor([[0.0, 0, 5, 3], [5, 0, 10, 3], [0, 3, 5, 6], [5, 3, 10, 6]]))


def test_3x3_cells_are_the_images_at_full_resolution():
    images = torch.randn(12, 3, 4, 6)
    layout = torch.randperm(12)[:9].view(1, 9).repeat(2, 1)
    layout[1] = layout[1].flip(0)
    grids, boxes = tile(images, layout, 3)
    assert grids.shape == (2, 3, 12, 18)
    for g in range(2):
        for k in range(9):
            x0, y0, x1, y1 = boxes[k].long().tolist()
            assert torch.equal(grids[g, :, y0:y1, x0:x1], images[layout[g, k]])


def test_bad_tiles_are_named():
    with pytest.raises(ValueError, match=r"layout must be an integer tensor \[G, 4\]"):
        tile(torch.randn(4, 3, 2, 2), torch.arange(9).view(1, 9), 2)
    with pytest.raises(ValueError, match=r"row indices in \[0, 4\)"):
        tile(torch.randn(4, 3, 2, 2), torch.tensor([[0, 1, 2, 4]]), 2)


# ---- grid_pointing_game --------------------------------------------------------------------------------------


def test_grid_pointing_game_by_hand():
    maps = torch.zeros(1, 4, 4, 4)  # one 2x2 grid of 2x2 cells
    maps[0, 0, :2, :2] = 1  # all in its own cell (0, top-left): 1
    maps[0, 1] = 0.5  # uniform: 1/4
    maps[0, 2, 2:, 2:] = 1  # all in cell 3, not its own (2, bottom-left): 0
    # map 3 is all zero: 0, as the energy pointing game
    values = grid_pointing_game(maps, torch.tensor([[4, 1, 0, 2]]), 6)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.25, 0.0, math.nan, 1.0, math.nan]), equal_nan=True)


def test_each_row_scores_its_own_map_in_its_own_cell():
    """Map k of grid g holds a share s[g, k] of its mass in cell k and the rest in cell (k + 1) % 4: the row in
    cell k gets s[g, k]. Read the wrong map, cell or row and the values move."""
    shares = torch.tensor([[0.9, 0.7, 0.5, 0.3], [0.8, 0.6, 0.4, 0.2]])
    maps = torch.zeros(2, 4, 6, 6)
    for g in range(2):
        for k in range(4):
            for cell, mass in ((k, shares[g, k]), ((k + 1) % 4, 1 - shares[g, k])):
                row, column = divmod(cell, 2)
                maps[g, k, 3 * row:3 * row + 3, 3 * column:3 * column + 3] = mass
    layout = torch.tensor([[7, 2, 5, 0], [1, 6, 3, 8]])
    values = grid_pointing_game(maps, layout, 10)
    expected = torch.full((10,), math.nan)
    expected[layout.flatten()] = shares.flatten()
    torch.testing.assert_close(values, expected, equal_nan=True)
    _, boxes = tile(torch.zeros(10, 1, 3, 3), layout, 2)  # the same as EP against the cell's box
    for g in range(2):
        torch.testing.assert_close(values[layout[g]], energy_pointing_game(maps[g], [box[None] for box in boxes]))


def test_no_grid_measures_nothing_and_bad_maps_are_named():
    assert grid_pointing_game(torch.zeros(0, 4, 8, 8), torch.zeros(0, 4, dtype=torch.long), 3).isnan().all()
    with pytest.raises(ValueError, match="square number"):
        grid_pointing_game(torch.rand(1, 3, 8, 8), torch.tensor([[0, 1, 2]]), 3)
    with pytest.raises(ValueError, match="divisible into n x n cells"):
        grid_pointing_game(torch.rand(1, 4, 7, 8), torch.tensor([[0, 1, 2, 3]]), 4)
    with pytest.raises(ValueError, match=r"maps must lie in \[0, 1\]"):
        grid_pointing_game(2 * torch.ones(1, 4, 8, 8), torch.tensor([[0, 1, 2, 3]]), 4)
    with pytest.raises(ValueError, match="more than one cell"):
        grid_pointing_game(torch.rand(2, 4, 8, 8), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 0]]), 7)
    with pytest.raises(ValueError, match="layout has 2 grids, maps 1"):
        grid_pointing_game(torch.rand(1, 4, 8, 8), torch.arange(8).view(2, 4), 8)


# ---- through explain, measure and the harness ------------------------------------------------------------------


def test_the_declaration():
    metric = METRICS["GPG"]
    assert (metric.name, metric.table, metric.group, metric.only_for) == ("grid pointing game", "localisation",
                                                                          "grid", "single-label")
    assert metric.higher_is_better and metric.percent and not metric.by_default and metric.needs == ("grid",)
    assert COMPUTED_INPUTS["grid"].explains and explains_again(metric.needs)  # not for the box baselines
    assert "grid" in metric_groups() and "grid" not in metric_groups(by_default=True)
    assert GRID_SIZE == 2


def test_measure_explains_each_cell_on_its_grid():
    """Class 0's images (red) carry a 2x2 blue patch (class 2's colour) in their corner: Grad-CAM of class 2 on a
    grid is its blue cell and that patch, so its rows score 64 / 68; the other classes' maps are their cells."""
    model, classes = colour_net(), torch.tensor([0, 1, 2, 3, 2, 0, 3, 1])
    images = colour_images(classes)
    images[classes == 0, :, :2, :2] = COLOURS[2][:, None, None]
    shared = shared_inputs(model, images, classes)
    assert torch.equal(shared["predictions"], classes) and (shared["p"] > 0.99).all()
    values, inputs = measure(model, images, torch.zeros(8, 8, 8), classes, [METRICS["GPG"]], shared, "gradcam",
                             {"layer": "1"})
    expected = torch.where(classes == 2, 64 / 68, 1.0)
    torch.testing.assert_close(values["GPG"], expected)
    grid = inputs["grid"]
    assert isinstance(grid, GridExplanations) and grid.maps.shape == (2, 4, 16, 16) and grid.rows == 8
    layout = grid_layout(classes, shared["p"], shared["predictions"], classes,
                         generator=torch.Generator().manual_seed(grid_seed(classes, GRID_SIZE)))
    assert torch.equal(grid.layout, layout)  # seeded by the classes: the same in every process and run
    grids, _ = tile(images, layout)
    torch.testing.assert_close(grid.maps[1], explain(model, grids[[1, 1, 1, 1]], "gradcam", classes[layout[1]],
                                                     layer="1"))


def test_rows_in_no_grid_are_not_measured():
    model, classes = colour_net(), torch.tensor([0, 1, 2, 3, 0])
    images = colour_images(classes)
    images[4, :, :, :5] = COLOURS[1][:, None, None]  # mostly green: predicted 1, labelled 0
    shared = shared_inputs(model, images, classes)
    values, _ = measure(model, images, torch.zeros(5, 8, 8), classes, [METRICS["GPG"]], shared, "gradcam",
                        {"layer": "1"})
    torch.testing.assert_close(values["GPG"], torch.tensor([1.0, 1, 1, 1, math.nan]), equal_nan=True)
    values, _ = measure(model, images[:3], torch.zeros(3, 8, 8), classes[:3], [METRICS["GPG"]],
                        shared_inputs(model, images[:3], classes[:3]), "gradcam", {"layer": "1"})
    assert values["GPG"].isnan().all()  # three classes make no 2x2 grid


def test_the_grids_need_a_method():
    classes = torch.arange(4)
    explained = Explanations(colour_net(), colour_images(classes), torch.zeros(4, 8, 8), classes, None,
                             shared=shared_inputs(colour_net(), colour_images(classes), classes))
    with pytest.raises(ValueError, match="needs a saliency method"):
        explained_grids(explained)


@pytest.mark.parametrize("name, method", [("resnet18_castream", "gradcam"), ("resnet18_castream", "attention"),
                                          ("resnet18_cifar", "gradcam"), ("mobilenetv2_cifar", "gradcam")])
def test_the_zoo_models_explain_grids_twice_their_input_size(name, method):
    model = timm.create_model(name, num_classes=4).eval()
    images = torch.randn(4, 3, 32, 32)
    grids, _ = tile(images, torch.arange(4).view(1, 4))
    maps = explain(model, grids.expand(4, -1, -1, -1), method, torch.arange(4))
    assert maps.shape == (4, 64, 64) and maps.isfinite().all()


def solved_checkpoint(folder, data, classes: int) -> str:
    """A random ResNet-18 whose classifier is solved (least squares on its features of the split's images, as the
    harness preprocesses them at 64 px) to give each image's label a logit of 10 and the others -10."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=classes).eval()
    config = resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    images, targets = dataset_images("imagenet-folder", data, config, range(classes), split="val")
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True).double()
        wanted = 20 * torch.eye(classes, dtype=torch.double)[[target["label"] for target in targets]] - 10
        model.fc.weight.copy_((torch.linalg.pinv(features) @ wanted).T)
        model.fc.bias.zero_()
    save_for_hf(model, folder, safe_serialization=True, model_config=dict(num_classes=classes))
    return f"local-dir:{folder}"


def test_a_run_with_metrics_grid_reports_gpg(tmp_path):
    data = photo_folder(tmp_path / "data", classes=4, per_class=1)
    weights = solved_checkpoint(tmp_path / "model", data, 4)
    main(["resnet18", "--weights", weights, "--dataset", "imagenet-folder", "--data-root", str(data), "--methods",
          "gradcam", "--metrics", "grid", "--out", str(tmp_path / "out"), "--img-size", "64", "--batch-size", "4",
          "--cpu"])
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["methods"]["gradcam"]["GPG"] <= 100
    assert results["recognition"]["top1"] == 100
    values = load_file(run_dir / "batches" / "000000.safetensors")["row/gradcam/GPG"]
    assert values.shape == (4,) and values.isfinite().all()  # one 2x2 grid of the four
    assert "| method | GPG↑ | s/image |" in (run_dir / "results.md").read_text()


# ---- grid_dataset ----------------------------------------------------------------------------------------------


def test_grids_over_a_dataset():
    classes = [0, 1, 2, 3] * 3 + [1]
    images = colour_images(classes)
    images[12, :, :, :5] = COLOURS[0][:, None, None]  # a 1 that the model calls 0
    dataset = [(image, {"label": label}) for image, label in zip(images, classes, strict=True)]
    found = grid_dataset(colour_net(), dataset, batch_size=5, seed=3)
    assert found.images.shape == (3, 3, 16, 16) and found.classes.shape == found.indices.shape == (3, 4)
    assert 12 not in found.indices and len(found.indices.unique()) == 12
    assert all(len(row.unique()) == 4 for row in found.classes)
    assert torch.equal(found.classes, torch.tensor(classes)[found.indices])
    grids, _ = tile(images, found.indices)
    assert torch.equal(found.images, grids)
    again = grid_dataset(colour_net(), dataset, count=2, seed=3)
    assert torch.equal(again.indices, found.indices[:2]) and torch.equal(again.images, found.images[:2])
    with pytest.raises(ValueError, match="no grid"):
        grid_dataset(colour_net(), dataset[:3])
    with pytest.raises(ValueError, match="single-label"):
        grid_dataset(colour_net(), [(image, {"label": torch.ones(4)}) for image, _ in dataset])


# ---- relevance rank and mass accuracy ---------------------------------------------------------------------------


def box_mask(height, width, boxes):
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.long().tolist():
        mask[y0:y1, x0:x1] = True
    return mask


def test_relevance_rank_and_mass_accuracy_match_quantus():
    """On maps without ties and rectangular masks: Quantus' RelevanceRankAccuracy is RRA; its
    RelevanceMassAccuracy is the energy pointing game EP (declared once, as EP)."""
    quantus = importlib.import_module("quantus")
    torch.manual_seed(2)
    maps = torch.rand(6, 12, 20, dtype=torch.float64)
    assert all(len(row.unique()) == 240 for row in maps.flatten(1))
    boxes = [torch.tensor([[2.0, 1, 9, 7]]), torch.tensor([[0.0, 0, 20, 3], [15, 5, 20, 12]]),
             torch.tensor([[4.0, 4, 5, 5]]), torch.tensor([[0.0, 0, 20, 12]]), torch.tensor([[10.0, 2, 18, 11]]),
             torch.tensor([[1.0, 6, 4, 12], [3, 8, 9, 10]])]
    masks = torch.stack([box_mask(12, 20, b) for b in boxes])[:, None].numpy()
    rank = quantus.RelevanceRankAccuracy(disable_warnings=True).evaluate_batch(a_batch=maps[:, None].numpy(),
                                                                              s_batch=masks)
    torch.testing.assert_close(relevance_rank_accuracy(maps, boxes), torch.as_tensor(rank))
    mass = quantus.RelevanceMassAccuracy(disable_warnings=True).evaluate_batch(a_batch=maps[:, None].numpy(),
                                                                              s_batch=masks)
    torch.testing.assert_close(METRICS["EP"].values({"maps": maps, "boxes": boxes}), torch.as_tensor(mass))


def test_relevance_rank_accuracy_by_hand_with_ties():
    box = [torch.tensor([[0.0, 0, 2, 2]])]  # K = 4 pixels of a 4 x 4 map
    maps = torch.zeros(4, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 1, 0.5  # one hit, one miss, then 14 zeros tied for 2 places, 3 of them inside
    maps[1, :2, :2] = 1  # the box itself
    maps[2, 2:, :] = 1  # its complement's top 4 are all outside
    maps[3] = 0.3  # constant: all 16 tied for 4 places, K / (H W)
    expected = torch.tensor([(1 + 3 * 2 / 14) / 4, 1, 0, 4 / 16])
    torch.testing.assert_close(relevance_rank_accuracy(maps, box * 4), expected)
    flipped = relevance_rank_accuracy(maps.flip(1, 2), [torch.tensor([[2.0, 2, 4, 4]])] * 4)
    torch.testing.assert_close(flipped, expected)  # ties count the same in any pixel order
    metric = METRICS["RRA"]
    assert (metric.name, metric.table, metric.group, metric.needs) == ("relevance rank accuracy", "localisation",
                                                                       "localisation", ("maps", "boxes"))
    with pytest.raises(ValueError, match="cover no pixel centre"):
        relevance_rank_accuracy(maps[:1], [torch.tensor([[0.2, 0.2, 0.4, 0.4]])])
