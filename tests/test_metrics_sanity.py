"""Model-parameter randomisation sanity checks: the similarities against scipy and scikit-image (as Quantus calls
them) and the entropy against Quantus', by hand; the randomisation against Quantus' ``get_random_layer_generator``
(names, order, parameters, cascading vs independent), MPRT and eMPRT against Quantus' ``MPRT`` and
``EfficientMPRT`` on the same model, images and explanation function; CA-Stream's order; the caller's model left
alone; bad input; the harness' ``--metrics sanity``; the experiment script on a briefly trained model."""

import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import skimage.metrics
import timm
import torch
from data_layouts import make_cub, make_fashion_mnist
from quantus import MPRT, EfficientMPRT
from quantus.functions.complexity_func import discrete_entropy as quantus_entropy
from quantus.functions.similarity_func import correlation_spearman
from quantus.functions.similarity_func import ssim as quantus_ssim
from quantus.helpers.model.pytorch_model import PyTorchModel
from scripts import run_script
from test_harness import CUB_TEST, run
from torch import nn

from zoo.evaluation.harness import measure, metric_groups
from zoo.evaluation.metrics.inputs import COMPUTED_INPUTS, Explanations
from zoo.evaluation.metrics.sanity import (
    Randomisation,
    RandomisationStep,
    average_similarity,
    discrete_entropy,
    efficient_mprt,
    model_randomisation,
    randomisation_steps,
    randomised_models,
    spearman,
    ssim,
)
from zoo.evaluation.saliency import explain
from zoo.metrics import METRICS
from zoo.training.config import Recipe
from zoo.training.train import train

KEYS = ("MPRT", "MPRT-SSIM", "IMPRT", "IMPRT-SSIM", "eMPRT")
QUARTER = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}  # the demo's ResNet-18 width
SIZE = 48  # a 3 x 3 last map at output stride 16: Grad-CAM's maps vary


def small_resnet(name: str = "resnet18") -> nn.Module:
    """A quarter-width ResNet-18 (the demo's) whose norms look trained: their resets change them."""
    model = timm.create_model(name, num_classes=4, **QUARTER).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2)
    return model


def batch(count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(count, 3, SIZE, SIZE), torch.arange(count) % 4


def states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(ours: nn.Module, theirs: nn.Module | dict) -> None:
    expected = theirs if isinstance(theirs, dict) else theirs.state_dict()
    found = ours.state_dict()
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[key], expected[key]) for key in found)


def scipy_spearman(a: np.ndarray, b: np.ndarray, batched: bool = True) -> np.ndarray:
    """Quantus' ``correlation_spearman`` row by row: its batched call fails when scipy returns one NaN for a batch
    of constant maps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)  # NaN for a constant map: compared apart
        return np.array([scipy.stats.spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)])


def quantus_explain(method: str):
    """Our ``explain`` as Quantus' ``explain_func``."""
    def explain_func(model, inputs, targets, **kwargs):
        return explain(model, torch.as_tensor(inputs), method, torch.as_tensor(targets)).numpy()
    return explain_func


# --- the similarities and the entropy -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spearman_is_scipys_with_ties(dtype):
    a, b = torch.rand(6, 12, 15, dtype=dtype), torch.rand(6, 12, 15, dtype=dtype)
    a[0], b[0] = (a[0] * 4).floor(), (b[0] * 3).floor()  # many ties
    a[1] = a[1].round(decimals=1)
    expected = [scipy.stats.spearmanr(x.flatten(), y.flatten())[0] for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    found = spearman(a, b)
    assert found.dtype == torch.promote_types(dtype, torch.float32)
    np.testing.assert_allclose(found.numpy(), expected, atol=1e-12 if dtype == torch.float64 else 1e-6)
    batched = correlation_spearman(a.flatten(1).numpy(), b.flatten(1).numpy(), batched=True)  # as Quantus' MPRT
    np.testing.assert_allclose(found.numpy(), batched, atol=1e-6)


def test_spearman_by_hand_and_its_constant_maps():
    ramp = torch.arange(4.0).view(1, 2, 2)
    assert spearman(ramp, ramp.flip(-1).flip(-2)).item() == pytest.approx(-1)
    assert spearman(torch.tensor([[[0.0, 0], [1, 1]]]), torch.tensor([[[0.0, 1], [0, 1]]])).item() == pytest.approx(0)
    # ranks [1.5, 1.5, 3, 4] and [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman(torch.tensor([[[0.0, 0], [1, 2]]]), ramp).item() == pytest.approx(3 / math.sqrt(10))
    zeros = torch.zeros(1, 8, 8, dtype=torch.float64)
    rounded = 0.5 + 1e-9 * torch.rand(1, 8, 8, dtype=torch.float64)  # constant up to rounding: ranks of noise
    assert spearman(zeros, zeros).item() == 1 and spearman(zeros, rounded).item() == 1
    assert spearman(zeros, torch.rand(1, 8, 8)).item() == 0 and spearman(torch.rand(1, 8, 8), rounded).item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_is_scikit_images_as_quantus_calls_it(dtype):
    a, b = torch.rand(5, 16, 21, dtype=dtype), torch.rand(5, 16, 21, dtype=dtype)
    b[1] = a[1] + 0.1 * b[1]  # alike
    b[2] = 3 * a[2] + 1  # another range: the data range is the pair's
    b[3] = 0  # beside a constant map: defined
    expected = [quantus_ssim(x, y) for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    direct = [skimage.metrics.structural_similarity(x, y, data_range=max(x.max(), y.max()) - min(x.min(), y.min()))
              for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True)]
    found = ssim(a, b)
    np.testing.assert_allclose(found.numpy(), expected, atol=1e-12 if dtype == torch.float64 else 1e-5)
    np.testing.assert_allclose(found.double().numpy(), direct, atol=1e-6)


def test_ssim_by_hand_and_its_constant_maps():
    board = (torch.arange(7)[:, None] + torch.arange(7)).remainder(2).double()[None]  # one 7 x 7 window, 24 ones
    mean, variance = 24 / 49, 49 / 48 * (24 / 49 - (24 / 49) ** 2)
    c1, c2 = 0.01**2, 0.03**2  # data range 1
    expected = c1 * c2 / ((mean**2 + c1) * (variance + c2))
    assert ssim(board, torch.zeros_like(board)).item() == pytest.approx(expected, rel=1e-12)
    assert ssim(board, board).item() == pytest.approx(1)
    zeros = torch.zeros(2, 9, 9)
    assert ssim(zeros, zeros).tolist() == [1, 1] and ssim(zeros, zeros + 1).tolist() == [1, 1]  # scikit-image: NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discrete_entropy_is_quantus(dtype):
    maps = torch.rand(40, 24, 24, dtype=dtype)
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    maps = (maps - low) / (high - low)  # as explain's: from 0 to 1
    maps[:10] = (maps[:10] * 100).round() / 100  # values on the bin edges
    maps[10:15] = (maps[10:15] * 7).floor() / 7
    maps[15] = 0.3  # constant
    expected = [quantus_entropy(a=m, x=m) for m in maps.numpy()]  # n_bins 100, numpy's histogram
    np.testing.assert_allclose(discrete_entropy(maps).double().numpy(), expected, rtol=1e-6, atol=1e-12)


def test_entropy_and_emprt_by_hand():
    halves = torch.cat([torch.zeros(1, 4, 8), torch.ones(1, 4, 8)], 1)
    levels = (torch.arange(100.0) / 99).view(1, 10, 10)  # one value per bin
    assert discrete_entropy(halves).item() == pytest.approx(math.log(2))
    assert discrete_entropy(levels).item() == pytest.approx(math.log(100))
    assert discrete_entropy(torch.full((1, 8, 8), 0.5)).item() == 0
    assert discrete_entropy(levels, bins=2).item() == pytest.approx(math.log(2))
    spread = (torch.arange(64.0) / 63).view(1, 8, 8)  # 64 values, each in its own bin
    assert efficient_mprt(halves, spread).item() == pytest.approx(math.log(64) / math.log(2))
    assert efficient_mprt(torch.zeros(1, 8, 8), torch.rand(1, 8, 8)).isnan().all()  # no ratio to a constant map
    assert average_similarity(torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, -1.0]])).tolist() == pytest.approx([0.5, -0.2])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shapes differ"):
        spearman(torch.rand(2, 8, 8), torch.rand(2, 8, 9))
    with pytest.raises(ValueError, match="NaN or Inf"):
        spearman(torch.full((1, 8, 8), torch.nan), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="maps"):
        spearman(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="at least 7 x 7"):
        ssim(torch.rand(1, 6, 20), torch.rand(1, 6, 20))
    with pytest.raises(ValueError, match="bins"):
        discrete_entropy(torch.rand(1, 8, 8), bins=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        average_similarity(torch.tensor([[1.5]]))
    model, (images, classes) = small_resnet(), batch(2)
    with pytest.raises(ValueError, match="preset"):
        randomisation_steps(model, images, "bottom_up")
    with pytest.raises(ValueError, match="order"):
        next(randomised_models(model, randomisation_steps(model, images), order="top_down"))
    with pytest.raises(ValueError, match="without reset_parameters"):
        next(randomised_models(model, [RandomisationStep("act1", ("act1",))]))
    with pytest.raises(ValueError, match="nothing to randomise"):
        randomisation_steps(nn.Sequential(nn.Flatten(), nn.ReLU()), images)
    with pytest.raises(ValueError, match="targets must be given"):
        model_randomisation(model, images, "gradcam", None)
    with pytest.raises(ValueError, match="Randomisation"):
        METRICS["MPRT"].values({"sanity": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="ground truth"):
        COMPUTED_INPUTS["sanity"].compute(Explanations(model, images, torch.rand(2, SIZE, SIZE), classes))


# --- the randomisation against Quantus' generator ------------------------------------------------------------------

def test_layers_are_quantus_top_down_cascading_and_independent():
    model, (images, _) = small_resnet(), batch(1)
    steps = randomisation_steps(model, images, "layers")
    reference = PyTorchModel(model, channel_first=True)
    names = [name for name, _ in reference.get_random_layer_generator("top_down", seed=7)]
    assert [step.name for step in steps] == names  # top-down: the classifier first, the stem last
    assert names[0] == "fc" and names[-1] == "conv1"
    assert len(names) == sum(hasattr(module, "reset_parameters") for module in model.modules())
    cascading = zip(randomised_models(model, steps, seed=7), reference.get_random_layer_generator("top_down", seed=7),
                    strict=True)
    for (name, ours), (their_name, theirs) in cascading:
        assert name == their_name
        assert_same_state(ours, theirs)
    # Quantus' independent order is bottom-up; each step's model matches by name
    independent = {name: states(theirs) for name, theirs in reference.get_random_layer_generator("independent", 7)}
    original = states(model)
    for index, (name, ours) in enumerate(randomised_models(model, steps, seed=7, order="independent")):
        assert_same_state(ours, independent[name])
        if index == 1:  # the classifier is trained again: not cascading
            assert torch.equal(ours.fc.weight, original["fc.weight"])
            assert not torch.equal(ours.layer4[1].bn2.running_var, original["layer4.1.bn2.running_var"])
    assert_same_state(model, original)


def test_blocks_group_the_layers_and_end_on_quantus_steps():
    model, (images, _) = small_resnet(), batch(1)
    blocks = randomisation_steps(model, images, "blocks")
    assert [step.name for step in blocks] == ["fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1",
                                               "layer2.0", "layer1.1", "layer1.0", "bn1", "conv1"]
    assert [name for step in blocks for name in step.modules] == \
        [step.name for step in randomisation_steps(model, images, "layers")]
    assert "layer4.0.downsample.0" in blocks[2].modules
    ends = {step.modules[-1]: step.name for step in blocks}
    expected = {}
    for name, theirs in PyTorchModel(model, channel_first=True).get_random_layer_generator("top_down", seed=42):
        if name in ends:
            expected[ends[name]] = states(theirs)
    assert len(expected) == len(blocks)
    for name, ours in randomised_models(model, blocks):
        assert_same_state(ours, expected[name])


def test_castream_order_runs_from_the_classifier_through_stream_and_stages():
    model, (images, classes) = small_resnet("resnet18_castream"), batch(2)
    model.freeze_backbone()
    blocks = [step.name for step in randomisation_steps(model, images, "blocks")]
    assert blocks == ["backbone.fc", "stream.blocks.4", "backbone.layer4.1", "backbone.layer4.0", "stream.blocks.3",
                      "backbone.layer3.1", "backbone.layer3.0", "stream.blocks.2", "backbone.layer2.1",
                      "backbone.layer2.0", "stream.blocks.1", "backbone.layer1.1", "backbone.layer1.0",
                      "stream.blocks.0", "backbone.bn1", "backbone.conv1"]
    layers = [step.name for step in randomisation_steps(model, images, "layers")]
    assert layers[:3] == ["backbone.fc", "stream.blocks.4.proj", "backbone.layer4.1.bn2"]
    assert layers[-1] == "backbone.conv1" and "stream.blocks.0.proj" in layers
    original, flags = states(model), [p.requires_grad for p in model.parameters()]
    result = model_randomisation(model, images, "gradcam", classes)
    assert result.steps == tuple(blocks) and result.cascading.shape == (2, 16, 2)
    assert result.cascading.isfinite().all() and result.independent.isfinite().all()
    assert_same_state(model, original)
    assert [p.requires_grad for p in model.parameters()] == flags and model.backbone_frozen


def test_the_callers_model_and_random_state_are_left_alone():
    model, (images, classes) = small_resnet(), batch(2)
    model.train()
    original, rng = states(model), torch.get_rng_state()
    flags = [p.requires_grad for p in model.parameters()]
    model_randomisation(model, images, "guided_backprop", classes)
    assert_same_state(model, original)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules())


def test_a_method_blind_to_the_weights_fails_with_similarity_one():
    model, (images, classes) = small_resnet(), batch(2)
    result = model_randomisation(model, images, "fakecam", classes)  # Fake-CAM: the same map whatever the model
    assert torch.equal(result.cascading, torch.ones_like(result.cascading))
    assert torch.equal(result.independent, torch.ones_like(result.independent))
    values = {key: METRICS[key].values({"maps": explain(model, images, "fakecam", classes), "sanity": result})
              for key in KEYS}
    assert all(torch.equal(value, torch.ones(2)) for value in values.values())


# --- MPRT and eMPRT against Quantus' metrics -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gradcam", "guided_backprop", "gradient"])
def test_mprt_is_quantus_layer_by_layer(method):
    model, (images, classes) = small_resnet(), batch(2)
    ours = model_randomisation(model, images, method, classes, preset="layers")
    for order, quantus_order in (("cascading", "top_down"), ("independent", "independent")):
        metric = MPRT(similarity_func=scipy_spearman, layer_order=quantus_order, seed=42, abs=False, normalise=False,
                      disable_warnings=True)
        metric(model=model, x_batch=images.numpy(), y_batch=classes.numpy(), explain_func=quantus_explain(method),
               channel_first=True, device="cpu", batch_size=len(images))
        scores = metric.evaluation_scores
        assert list(scores)[0] == "original" and set(list(scores)[1:]) == set(ours.steps)
        expected = np.array([scores[name] for name in ours.steps]).T  # [N, S], in our (top-down) order
        found = getattr(ours, order)[..., 0].double().numpy()
        finite = np.isfinite(expected)  # Quantus: NaN for a constant map, where we follow coherency
        assert finite.any()
        np.testing.assert_allclose(found[finite], expected[finite], atol=1e-6)
        assert ((found[~finite] == 0) | (found[~finite] == 1)).all()
        if finite.all():  # Quantus' average also counts its "original" entry, the maps compared with themselves
            averaged = (expected.sum(1) + np.array(scores["original"])) / (expected.shape[1] + 1)
            np.testing.assert_allclose(metric.recompute_average_correlation_per_sample(), averaged, atol=1e-12)
            np.testing.assert_allclose(average_similarity(getattr(ours, order)[..., 0]).numpy(), expected.mean(1),
                                       atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "guided_backprop"])
def test_emprt_is_quantus_efficient_mprt(method):
    model, (images, classes) = small_resnet(), batch(3)
    maps = explain(model, images, method, classes)
    result = model_randomisation(model, images, method, classes, maps)
    found = METRICS["eMPRT"].values({"maps": maps, "sanity": result})
    torch.testing.assert_close(found, efficient_mprt(maps, result.randomised_maps), equal_nan=True)
    metric = EfficientMPRT(seed=42, disable_warnings=True)  # bottom-up to the same fully randomised model
    relative = metric(model=model, x_batch=images.numpy(), y_batch=classes.numpy(),
                      explain_func=quantus_explain(method), channel_first=True, device="cpu", batch_size=len(images))
    defined = ~found.isnan()  # Quantus divides by a constant map's entropy 0
    assert defined.any()
    np.testing.assert_allclose(found[defined].numpy(), np.array(relative)[defined] + 1, rtol=1e-5)  # its ratio - 1


# --- the registry and the harness ---------------------------------------------------------------------------------

def test_the_declarations():
    assert [key for key, metric in METRICS.items() if metric.group == "sanity"] == list(KEYS)
    for key in KEYS:
        metric = METRICS[key]
        assert (metric.table, metric.by_default, metric.percent) == ("sanity", False, False)
        assert metric.higher_is_better == (key == "eMPRT")
    assert METRICS["eMPRT"].needs == ("maps", "sanity") and METRICS["MPRT"].needs == ("sanity",)
    assert COMPUTED_INPUTS["sanity"].explains
    assert "sanity" in metric_groups() and "sanity" not in metric_groups(by_default=True)


def test_measure_computes_the_sanity_input_once_for_the_five():
    model, (images, classes) = small_resnet(), batch(2)
    maps = explain(model, images, "gradcam", classes, layer="layer4")
    values, inputs = measure(model, images, maps, classes, [METRICS[key] for key in KEYS], {}, "gradcam",
                             {"layer": "layer4"})
    expected = model_randomisation(model, images, "gradcam", classes, maps, {"layer": "layer4"})
    assert isinstance(inputs["sanity"], Randomisation)
    torch.testing.assert_close(inputs["sanity"].cascading, expected.cascading)
    torch.testing.assert_close(values["MPRT"], expected.cascading[..., 0].mean(1))
    torch.testing.assert_close(values["IMPRT-SSIM"], expected.independent[..., 1].mean(1))


def test_a_run_with_metrics_sanity_reports_the_five(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST[:2])
    run_dir, results = run(tmp_path, "resnet18", "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                           "--methods", "gradcam", "box", "--metrics", "sanity")
    gradcam = results["methods"]["gradcam"]
    assert set(KEYS) <= set(gradcam) and not set(KEYS) & set(results["methods"]["box"])  # a box explains nothing
    assert all(-1 <= gradcam[key] <= 1 for key in KEYS[:4]) and gradcam["eMPRT"] > 0
    assert "| method | MPRT↓ | MPRT-SSIM↓ | IMPRT↓ | IMPRT-SSIM↓ | eMPRT↑ | s/image |" in \
        (run_dir / "results.md").read_text()


# --- the experiment -------------------------------------------------------------------------------------------------

def test_the_experiment_checks_a_trained_model(tmp_path, capsys):
    make_fashion_mnist(tmp_path / "fashion-mnist", train=16, test=8)
    recipe = Recipe(name="gap", model="resnet18", model_args=QUARTER, dataset="fashion-canvas",
                    data_root=str(tmp_path / "fashion-mnist"), dataset_options={"source": "idx", "size": SIZE},
                    val_split="test", image_size=SIZE, data_config={"crop_pct": 1.0}, augmentation="cifar", epochs=1,
                    batch_size=8, lr=0.05, milestones=[], workers=0, limit=16, val_limit=8,
                    output_dir=str(tmp_path / "runs" / "gap"))
    model_dir = train(recipe)
    with pytest.raises(SystemExit, match="make demo"):
        run_script("experiments/sanity_check.py", ["--demo", str(tmp_path / "no-demo")])
    out = tmp_path / "sanity"
    run_script("experiments/sanity_check.py", ["--model-dir", str(model_dir), "--images", "4", "--out", str(out)])
    results = json.loads((out / "sanity.json").read_text())
    assert results["images"] == 4 and len(results["steps"]) == 11 and results["steps"][0] == "fc"
    assert list(results["methods"]) == ["gradcam", "guided_backprop", "gradient"]
    for entry in results["methods"].values():
        assert set(entry["metrics"]) == set(KEYS)
        assert len(entry["cascading"]["spearman"]["mean"]) == len(entry["independent"]["ssim"]["std"]) == 11
    table = (out / "sanity.md").read_text()
    assert "| method | MPRT↓ | MPRT-SSIM↓ | IMPRT↓ | IMPRT-SSIM↓ | eMPRT↑ |" in table
    assert f"{results['methods']['gradcam']['metrics']['MPRT']:.3f}" in table
    assert (out / "sanity.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
