"""zoo-publish of a toy run (3 classes, 32 px, castream_imagenet's recipe from a random initialisation): the Hub
folder describes that run and claims nothing it did not do (issue 24)."""

import dataclasses
import json

import pytest
import timm
from data_layouts import make_image_folder
from huggingface_hub import ModelCard
from timm.models import save_for_hf

from zoo.evaluation import harness, model_card
from zoo.evaluation.publish import main
from zoo.hub import add_to_hf_cache, sha256
from zoo.training.config import load_recipe
from zoo.training.train import starting_weights, train

CLASSES = ["cat", "dog", "fox"]
NAME = "resnet18_castream.toy"
CLAIMS = ("imagenet-1k", "in1k", "224 px", "224, 224", "tv_in1k", "frozen resnet", "paper's figure", "of the thesis)",
          "bsd-3-clause")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """(the run's model folder, a zoo-eval results file of it on 4 images)."""
    tmp = tmp_path_factory.mktemp("toy")
    data = make_image_folder(tmp / "data", classes=CLASSES, per_class=4)
    recipe = load_recipe("castream_imagenet", model="resnet18_castream", model_args={"backbone": "resnet10t"},
                         weights=None, data_root=str(data), image_size=32, workers=0, batch_size=4, epochs=1,
                         output_dir=str(tmp / "run"))
    model_dir = train(recipe, cpu=True)
    harness.main(["resnet18_castream", "--weights", str(model_dir), "--dataset", "imagenet-folder", "--data-root",
                  str(data), "--limit", "4", "--methods", "gradcam", "--metrics", "faithfulness", "--batch-size", "4",
                  "--cpu", "--out", str(tmp / "eval")])
    (results,) = (tmp / "eval").glob("*/results.json")
    return model_dir, results


def publish(toy_run, out):
    model_dir, results = toy_run
    main([str(model_dir), f"someone/{NAME}", "--results", str(results), "--out", str(out), "--dry-run"])
    return json.loads((out / "config.json").read_text()), ModelCard.load(out / "README.md")


def test_config_describes_the_run(toy_run, tmp_path):
    config, _ = publish(toy_run, tmp_path / "hub")
    assert not [claim for claim in CLAIMS if claim in json.dumps(config).lower()]
    assert set(config) == {"architecture", "num_classes", "num_features", "label_names", "model_args",
                           "pretrained_cfg", "training", "weights_sha256"}
    assert (config["architecture"], config["num_classes"], config["label_names"]) == ("resnet18_castream", 3, CLASSES)
    assert config["model_args"]["backbone"] == "resnet10t"
    assert config["weights_sha256"] == sha256(tmp_path / "hub" / "model.safetensors")
    cfg = config["pretrained_cfg"]
    assert (cfg["tag"], cfg["license"], cfg["num_classes"]) == ("toy", "apache-2.0", 3)
    assert cfg["input_size"] == [3, 32, 32] and cfg["hf_hub_filename"] == "model.safetensors"
    (notes,) = cfg["notes"]
    assert "from a random initialisation" in notes and "3 classes at 32 px" in notes
    assert config["training"] == dict(
        recipe="castream_imagenet", dataset="imagenet-folder", classes=3, train_images=12, val_images=12,
        image_size=32, epochs=1, steps=3, objective="classification", freeze_backbone=True, new_classifier=False,
        weights=None, weights_sha256=None, base_model=None, weights_license=None, license="apache-2.0")


def test_card_claims_only_what_the_run_did(toy_run, tmp_path):
    _, card = publish(toy_run, tmp_path / "hub")
    assert not [claim for claim in CLAIMS if claim in str(card).lower()]
    assert card.data.to_dict() == dict(
        library_name="timm", license="apache-2.0", pipeline_tag="image-classification",
        tags=["image-classification", "timm", "interpretability", "saliency", "ca-stream", "interpretable-zoo"])
    assert card.data.eval_results is None  # 4 images: below the minimum for a reported figure
    assert "- **Input:** 32 px" in card.text and "3 classes" in card.text
    assert ("- **Training:** `zoo-train` recipe `castream_imagenet`, 1 epoch(s) (3 steps) on 12 training images "
            "(`imagenet-folder` data, 3 classes) at 32 px, from a random initialisation" in card.text)
    assert f"measured on 4 images, below the minimum {model_card.MIN_IMAGES} for a reported figure" in card.text
    assert "**Starts from:**" not in card.text


def test_a_figure_on_enough_images_names_the_data_it_was_measured_on(toy_run, tmp_path, monkeypatch):
    monkeypatch.setattr(model_card, "MIN_IMAGES", 4)
    _, card = publish(toy_run, tmp_path / "hub")
    entries = card.data.eval_results
    assert entries and all((entry.dataset_type, entry.dataset_name) == ("imagenet-folder",
                                                                        "`imagenet-folder` data, 3 classes")
                           for entry in entries)
    assert not [claim for claim in CLAIMS if claim in str(card).lower()]  # no thesis tables beside 3-class data
    assert "below the minimum" not in card.text


def test_a_tag_that_declares_other_training_data_is_refused(toy_run, tmp_path, capsys):
    model_dir, results = toy_run
    with pytest.raises(SystemExit):
        main([str(model_dir), "someone/resnet18_castream.in1k", "--results", str(results), "--out",
              str(tmp_path / "hub"), "--dry-run"])
    assert ("resnet18_castream.in1k: its tag declares weights trained on ImageNet-1k, but this run trained on "
            "`imagenet-folder` data, 3 classes; publish it under a tag of its own") in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


def test_starting_weights_name_their_hub_repository_and_licence_only_when_they_come_from_the_hub(tmp_path):
    backbone = timm.create_model("resnet18", num_classes=3)
    save_for_hf(backbone, tmp_path / "saved", safe_serialization=True,
                model_config=dict(num_classes=3, pretrained_cfg=dict(license="mit")))
    add_to_hf_cache(tmp_path / "saved", "someone/resnet18-toy")
    tagged = timm.models.get_pretrained_cfg("resnet18.tv_in1k")  # timm's own tag, from its Hub repository
    add_to_hf_cache(tmp_path / "saved", tagged.hf_hub_id)
    recipe = load_recipe("castream_imagenet", model="resnet18", data_root=str(tmp_path))
    expected = {  # weights named as the recipe names them: (recorded name, base_model, licence)
        "hf-hub:someone/resnet18-toy": ("hf-hub:someone/resnet18-toy", "someone/resnet18-toy", "mit"),
        "resnet18.tv_in1k": ("resnet18.tv_in1k", "timm/resnet18.tv_in1k", "bsd-3-clause"),
        f"local-dir:{tmp_path / 'saved'}": (f"local-dir:{tmp_path / 'saved'}", None, "mit"),
        str(tmp_path / "saved" / "model.safetensors"): (str(tmp_path / "saved" / "model.safetensors"), None, None),
    }
    for weights, (named, base_model, licence) in expected.items():
        start = starting_weights(dataclasses.replace(recipe, weights=weights))
        assert (start["weights"], start["base_model"], start["weights_license"]) == (named, base_model, licence)
        assert start["weights_sha256"] == sha256(tmp_path / "saved" / "model.safetensors")
