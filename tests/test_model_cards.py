"""Model cards: every model-index number is a results file's, thesis figures are labelled, regeneration is stable."""

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image

import zoo
from zoo.evaluation.harness import Protocol
from zoo.evaluation.model_card import BIBTEX, MIN_IMAGES, UNREPORTED, main, regenerate
from zoo.metrics import METRICS

REPOSITORY_CARDS = Path(__file__).resolve().parents[1] / "model_cards"

FAITHFULNESS = ("AD", "AG", "AI", "I", "D")
LOCALISATION = ("OM", "LE", "F1", "BA", "SP", "EP", "SM")


def write_results(folder: Path, model: str = "resnet18_castream", dataset: str = "cub", weights: str = "runs/x/model",
                  weights_sha256: str | None = None, num_classes: int = 3, methods=("gradcam", "attention"),
                  metrics=FAITHFULNESS, limit: int | None = None, images: int = MIN_IMAGES,
                  size: int = 64, split: str = "test") -> Path:
    """A zoo-eval run folder (results.json in the harness' format, examples.png) with random numbers, measured on
    ``images`` images (default: just enough to be reported)."""
    protocol = Protocol(model=model, weights=weights, num_classes=num_classes, dataset=dataset, data_root="/data",
                        split=split, limit=limit, methods=list(methods),
                        data_config=dict(input_size=(3, size, size), interpolation="bilinear", crop_pct=0.875,
                                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    rng = random.Random(protocol.key())
    results = dict(protocol={**asdict(protocol), "weights_sha256": weights_sha256}, key=protocol.key(),
                   versions={"interpretable-zoo": "0.1.0"}, images=images,
                   explanations=images, recognition={"top1": rng.uniform(0, 100)},
                   methods={m: {**{k: rng.uniform(0, 100) for k in metrics}, "seconds_per_image": 0.1}
                            for m in methods})
    run = folder / protocol.key()
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    Image.new("RGB", (4, 4)).save(run / "examples.png")
    return run / "results.json"


def assert_model_index_is_the_results(folder: Path) -> int:
    """Every model-index value equals its results file's number, and every number of a results file measured on
    enough images is there; returns the count."""
    card = ModelCard.load(folder / "README.md")
    kinds = {metric.index_type: key for key, metric in METRICS.items()}
    reported = {}
    for entry in card.data.eval_results:
        results = json.loads((folder / entry.metric_args["results"]).read_text())
        values = results["recognition"] if entry.metric_config is None else results["methods"][entry.metric_config]
        assert entry.metric_value == values[kinds[entry.metric_type]]
        assert entry.dataset_split == results["protocol"]["split"]
        reported[entry.metric_args["results"], entry.metric_config, entry.metric_type] = entry.metric_value
    numbers = 0
    for path in (folder / "results").glob("*.json"):
        results = json.loads(path.read_text())
        if results["images"] < MIN_IMAGES:
            continue
        numbers += len(results["recognition"]) + sum(len(set(v) - set(UNREPORTED)) for v in results["methods"].values())
    assert len(reported) == numbers
    return numbers


def test_card_reports_every_measured_number_beside_the_thesis_figures(tmp_path):
    imagenet = write_results(tmp_path / "runs", dataset="imagenet-folder", num_classes=1000,
                             methods=("gradcam", "scorecam"), images=50_000, size=224, split="val")  # thesis
    cub = write_results(tmp_path / "runs", num_classes=1000, metrics=FAITHFULNESS + ("ADCC",) + LOCALISATION)
    main(["resnet18_castream.in1k", "--results", str(imagenet), str(cub), "--root", str(tmp_path / "cards")])
    folder = tmp_path / "cards" / "resnet18_castream.in1k"
    assert assert_model_index_is_the_results(folder) == 1 + 2 * 5 + 1 + 2 * 13
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "bsd-3-clause"
    assert {"image-classification", "timm", "interpretability", "saliency", "ca-stream"} <= set(card.data.tags)
    assert card.data.datasets == ["imagenet-1k"]  # what the tag was trained on, not what it was evaluated on
    assert card.data.base_model == "timm/resnet18.tv_in1k"
    stored = json.loads(imagenet.read_text())
    stem = f"imagenet-folder-{stored['key']}"
    assert (folder / "results" / f"{stem}.png").is_file() and f"(results/{stem}.png)" in card.text
    # Table 3.1 (CA-Stream, Grad-CAM) and 3.3 beside our row, each labelled
    date = json.loads((folder / "results" / f"{stem}.json").read_text())["date"]
    ours = stored["methods"]["gradcam"]
    assert "| Grad-CAM | thesis (paper's figure): CA-Stream | 16.99 | 17.22 | 44.95 | 65.94 | 10.68 |" in card.text
    assert "| thesis (paper's figure): CA-Stream | 67.54 |" in card.text
    assert (f"| Grad-CAM | ours (measured, `results/{stem}.json`, {date}) | "
            + " | ".join(f"{ours[k]:.2f}" for k in FAITHFULNESS) + " |") in card.text
    assert "| method | source | OM↓ | LE↓ | F1↑ | BA↑ | SP↑ | EP↑ | SM↓ |" in card.text
    assert 'timm.create_model("resnet18_castream.in1k", pretrained=True)' in card.text
    assert "preset `released`" in card.text and BIBTEX in card.text


def test_cards_without_results_say_so_and_report_no_number(tmp_path):
    regenerate(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(zoo.list_models(pretrained=True))
    card = ModelCard.load(tmp_path / "resnet18_cifar.c100_gd" / "README.md")
    assert "**No results yet**" in card.text and "ours (measured" not in card.text
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "| thesis (paper's figure): gradient denoising, cosine, λ 0.0075 | 72.86 |" in card.text


def test_regenerating_gives_the_same_cards_and_keeps_hand_added_metadata(tmp_path):
    results = write_results(tmp_path / "runs", model="resnet50_castream", num_classes=1000)
    main(["resnet50_castream.in1k", "--results", str(results), "--root", str(tmp_path / "cards")])
    regenerate(tmp_path / "cards")
    first = {p: p.read_bytes() for p in (tmp_path / "cards").rglob("*") if p.is_file()}
    regenerate(tmp_path / "cards")
    assert {p: p.read_bytes() for p in (tmp_path / "cards").rglob("*") if p.is_file()} == first
    # someone adds metadata to a card: regeneration keeps it
    readme = tmp_path / "cards" / "resnet50_castream.in1k" / "README.md"
    card = ModelCard.load(readme)
    card.data.tags.append("hand-added")
    card.data.pipeline_note = "kept"
    card.save(readme)
    regenerate(tmp_path / "cards")
    card = ModelCard.load(readme)
    assert "hand-added" in card.data.tags and card.data.pipeline_note == "kept"
    assert_model_index_is_the_results(readme.parent)


def test_the_repository_cards_are_regenerated(tmp_path):
    shutil.copytree(REPOSITORY_CARDS, tmp_path / "cards")
    regenerate(tmp_path / "cards")
    for path in (tmp_path / "cards").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (REPOSITORY_CARDS / path.relative_to(tmp_path / "cards")).read_bytes(), path


@pytest.mark.parametrize("change, message", [
    (dict(model="resnet50_castream"), "holds results of resnet50_castream, not of resnet18_castream"),
    (dict(weights=None), "measured on a random initialisation"),
])
def test_results_of_another_model_or_of_no_weights_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        main(["resnet18_castream.in1k", "--results", str(write_results(tmp_path, num_classes=1000, **change)),
              "--root", str(tmp_path)])


def test_citations_have_one_source():
    assert BIBTEX in (Path(__file__).parent.parent / "README.md").read_text()
