"""The metric registry (zoo.metrics): one declaration puts a metric in the harness' results, its tables and the
model cards; ``reported_value`` is the one place where per-image values become the reported number."""

import json
import math

import pytest
import torch
from data_layouts import make_cub
from huggingface_hub import ModelCard
from test_harness import CUB_TEST, run
from test_model_cards import assert_model_index_is_the_results, write_results

from zoo.evaluation import harness, model_card
from zoo.metrics import METRICS, Metric, register_metric, reported_value, scored_labels, tables

# ---- the worked example of evaluation/README.md: a metric declared once, nowhere else -----------------------


def coverage(maps: torch.Tensor) -> torch.Tensor:
    """The share of the image a map covers: its mean, a fraction per image."""
    return maps.mean((1, 2))


@pytest.fixture
def with_coverage():
    metric = register_metric(Metric(key="CV", name="map coverage", index_type="coverage", higher_is_better=False,
                                    per_image=coverage, needs=("maps",), table="faithfulness", group="faithfulness"))
    yield metric
    del METRICS[metric.key]


def test_a_registered_metric_reaches_the_results_and_the_tables(tmp_path, capsys, with_coverage):
    make_cub(tmp_path / "data", images=CUB_TEST)
    run_dir, results = run(tmp_path, "resnet18", "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                           "--methods", "gradcam", "fakecam", "--metrics", "faithfulness")
    fakecam = results["methods"]["fakecam"]
    assert fakecam["CV"] == pytest.approx(100 * (1 - 1 / 64**2))  # ones but one pixel of 64 x 64, in percent
    assert 0 <= results["methods"]["gradcam"]["CV"] <= 100
    assert "| method | AD↓ | AG↑ | AI↑ | CV↓ | s/image |" in (run_dir / "results.md").read_text()
    capsys.readouterr()
    harness.compare_main([str(run_dir / "results.json")])
    assert f"| fakecam | resnet18 | {fakecam['AD']:.2f} | {fakecam['AG']:.2f} | {fakecam['AI']:.2f} | " \
           f"{fakecam['CV']:.2f} |" in capsys.readouterr().out


def test_a_registered_metric_reaches_the_model_index(tmp_path, with_coverage):
    results = write_results(tmp_path / "runs", num_classes=1000, metrics=("AD", "CV"))
    model_card.main(["resnet18_castream.in1k", "--results", str(results), "--root", str(tmp_path / "cards")])
    folder = tmp_path / "cards" / "resnet18_castream.in1k"
    assert assert_model_index_is_the_results(folder) == 1 + 2 * 2
    card = ModelCard.load(folder / "README.md")
    entry = next(e for e in card.data.eval_results if e.metric_type == "coverage" and e.metric_config == "gradcam")
    assert entry.metric_name == "map coverage (Grad-CAM)"
    assert entry.metric_value == json.loads(results.read_text())["methods"]["gradcam"]["CV"]
    assert "| method | source | AD↓ | CV↓ |" in card.text


def test_a_metric_added_to_a_group_makes_its_runs_new_ones(with_coverage, monkeypatch):
    """Cached batches hold per-image values by metric key: the protocol's key covers the keys its groups
    resolve to, so a run cached without a metric (or before the natural-units convention) is never reused."""
    protocol = harness.Protocol(model="resnet18", weights=None, num_classes=3, dataset="cub", data_root="/data",
                                split="test", limit=None, methods=["gradcam"], metrics=["faithfulness"])
    with_it = protocol.key()
    monkeypatch.delitem(METRICS, with_coverage.key)
    assert protocol.key() != with_it
    assert harness.Protocol(**{**protocol.__dict__, "metrics": ["curves"]}).key() != protocol.key()


# ---- the layout the thesis' tables keep, the harness' groups --------------------------------------------------


def test_the_tables_keep_the_thesis_layout():
    assert {title: [metric.key for metric in columns] for title, columns in tables().items()} == {
        "recognition": ["top1", "top5", "mAP"],
        "faithfulness": ["AD", "AG", "AI", "I", "D", "ADCC", "ROAD-MoRF", "ROAD-LeRF", "ROAD", "ARCC"],
        "localisation": ["OM", "LE", "F1", "BA", "SP", "EP", "SM", "RRA", "GPG"],
        "sanity": ["MPRT", "MPRT-SSIM", "IMPRT", "IMPRT-SSIM", "eMPRT"],
    }
    assert harness.metric_groups() == ["faithfulness", "curves", "adcc", "road", "localisation", "grid", "sanity"]
    # the thesis' groups by default; ROAD, the grid pointing game and the sanity checks when asked (costly)
    assert harness.metric_groups(by_default=True) == ["faithfulness", "curves", "adcc", "localisation"]
    assert harness.box_groups() == {"localisation"}


def test_labels_decide_which_metrics_apply():
    assert METRICS["OM"].applies(multi_label=False, num_classes=3) and not METRICS["OM"].applies(True, 3)
    assert METRICS["mAP"].applies(True, 20) and not METRICS["mAP"].applies(False, 20)
    assert METRICS["top5"].applies(False, 5) and not METRICS["top5"].applies(False, 4)
    assert METRICS["AD"].applies(True, 2) and METRICS["AD"].applies(False, 2)


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="a metric 'AD' is registered already"):
        register_metric(METRICS["AD"])
    with pytest.raises(ValueError, match="needs unknown inputs logits"):
        Metric(key="X", name="x", index_type="x", higher_is_better=True, per_image=coverage, needs=("logits",),
               table="faithfulness", group="faithfulness")
    with pytest.raises(ValueError, match="only_for must be None or one of single-label, multi-label"):
        Metric(key="X", name="x", index_type="x", higher_is_better=True, per_image=coverage, needs=("maps",),
               table="faithfulness", group="faithfulness", only_for="single")


# ---- reported_value: reduction, percent, exclusion -------------------------------------------------------------


def test_a_percentage_is_the_mean_times_100():
    values = torch.tensor([0.5, 0.0, 0.0, 0.75])
    assert reported_value(METRICS["AD"], values) == pytest.approx(31.25)
    assert reported_value(METRICS["I"], torch.tensor([0.2, 0.4])) == pytest.approx(30.0)


def test_a_plain_number_is_the_mean_as_it_is():
    values = torch.tensor([math.log(0.2), math.log(0.05) - math.log(0.5)])
    assert reported_value(METRICS["SM"], values) == pytest.approx(values.mean().item())


def test_explanations_without_a_box_are_left_out():
    hits = torch.tensor([1.0, 0.0, 1.0, 1.0])
    kept = torch.tensor([True, True, False, True])
    assert reported_value(METRICS["SP"], hits, kept) == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="no image to report SP"):
        reported_value(METRICS["SP"], hits, torch.zeros(4, dtype=torch.bool))


def test_max_box_accuracy_is_its_own_reduction():
    hits = torch.tensor([[[1.0, 1.0], [0.0, 1.0]],   # image 1: [map threshold, IoU threshold]
                         [[0.0, 0.0], [1.0, 0.0]],   # image 2
                         [[0.0, 0.0], [0.0, 0.0]]])  # image 3, left out
    # the first two images: per threshold means [[.5, .5], [.5, .5]] -> best per IoU [.5, .5] -> 50 %
    assert reported_value(METRICS["BA"], hits, torch.tensor([True, True, False])) == pytest.approx(50.0)
    assert reported_value(METRICS["BA"], hits) == pytest.approx(100 / 3)


def test_mean_average_precision_is_a_dataset_reduction():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2]])
    labels = torch.tensor([[0, 0], [1, 1], [1, 1]])
    # class 0: precision 1/2 and 2/3 at its positives; class 1: 1 and 1 -> mAP ((1/2 + 2/3) / 2 + 1) / 2
    expected = 100 * ((1 / 2 + 2 / 3) / 2 + 1) / 2
    assert reported_value(METRICS["mAP"], scored_labels(scores, labels)) == pytest.approx(expected)
    # the images' order does not matter, and neither does how they were split into batches
    rows = torch.cat([scored_labels(scores[2:], labels[2:]), scored_labels(scores[:2], labels[:2])])
    assert reported_value(METRICS["mAP"], rows) == pytest.approx(expected)
