"""Bad input and damaged state in the harness and the saliency methods: nothing lost, nothing stale.

Every case is refused with an error that names the problem (the flag, the option, the file, the image), or
handled and reported; never a crash after all other work, never a silently wrong number.
"""

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from data_layouts import CubImage, make_cub, make_image_folder
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_harness import CUB_TEST, FAST, run, scores
from timm.models import save_for_hf

from zoo.data import build_dataset
from zoo.evaluation import harness
from zoo.evaluation.harness import Protocol, main
from zoo.evaluation.harness import run as run_protocol
from zoo.evaluation.saliency import METHODS, explain
from zoo.hub import add_to_hf_cache, resolve_weights, sha256

CUB_SIZE = (500, 333)  # a typical CUB photograph: at 224 px timm's centre crop cuts ~100 px off each side
OUTSIDE_THE_CROP = CubImage(1, False, (10, 100, 60, 120), CUB_SIZE)  # wholly in the left strip the crop drops
CUB_WITH_A_CROPPED_BOX = (CubImage(2, False, (150, 60, 200, 200), CUB_SIZE), OUTSIDE_THE_CROP,
                          CubImage(3, False, (200, 100, 120, 150), CUB_SIZE))


def cub_args(root, *args):
    return ["resnet18", "--dataset", "cub", "--data-root", str(root), *args]


def test_an_explanation_whose_box_the_crop_removes_is_left_out_of_localisation(tmp_path):
    make_cub(tmp_path / "data", images=CUB_WITH_A_CROPPED_BOX)
    out = tmp_path / "out"
    main(cub_args(tmp_path / "data", "--methods", "gradcam", "box", "box_complement", "--metrics", "faithfulness",
                  "localisation", "--batch-size", "2", "--cpu", "--out", str(out)))  # the default 224 px
    (run_dir,) = out.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"]["data_config"]["input_size"] == [3, 224, 224]
    assert results["images"] == results["explanations"] == 3
    assert results["excluded_from_localisation"] == {"explanations": 1, "images": [1]}
    box = results["methods"]["box"]
    assert box["LE"] < 5 and box["SP"] == box["F1"] == 100  # the empty map of image 1 would be LE 100
    assert results["methods"]["box_complement"]["SP"] == 0
    assert all(math.isfinite(value) for values in results["methods"].values() for value in values.values())
    assert "1 of 3 explanations" in (run_dir / "results.md").read_text()


def test_when_no_box_is_left_inside_the_crop_there_are_no_localisation_numbers(tmp_path):
    make_cub(tmp_path / "data", images=(OUTSIDE_THE_CROP,))
    _, results = run(tmp_path, *cub_args(tmp_path / "data", "--methods", "gradcam", "box", "--metrics",
                                         "faithfulness", "localisation"))
    assert results["excluded_from_localisation"] == {"explanations": 1, "images": [0]}
    assert {"AD", "AG", "AI"} == set(results["methods"]["box"]) - {"seconds_per_image"}


def test_new_weights_at_the_same_path_are_a_new_run(tmp_path, capsys):
    make_cub(tmp_path / "data", images=CUB_TEST)
    weights, out = tmp_path / "weights.safetensors", tmp_path / "out"
    args = cub_args(tmp_path / "data", "--methods", "gradcam", "--metrics", "faithfulness", "--out", str(out), *FAST)
    hashes = []
    for seed in (1, 2):  # trained again, saved at the same path
        torch.manual_seed(seed)
        save_file(timm.create_model("resnet18", num_classes=3).state_dict(), weights)
        hashes.append(sha256(weights))
        capsys.readouterr()
        main([*args, "--weights", str(weights)])
        assert "already holds" not in capsys.readouterr().out
    runs = {results["protocol"]["weights_sha256"]: results
            for results in (json.loads(path.read_text()) for path in out.glob("*/results.json"))}
    assert sorted(runs) == sorted(hashes) and hashes[0] != hashes[1]
    assert scores(runs[hashes[0]]) != scores(runs[hashes[1]])
    # the same content at another path: the same run
    weights.rename(tmp_path / "moved.safetensors")
    main([*args, "--weights", str(tmp_path / "moved.safetensors")])
    assert "already holds the results" in capsys.readouterr().out


def test_weights_are_hashed_in_the_file_they_resolve_to(tmp_path):
    model = timm.create_model("resnet18_castream", num_classes=3)
    folder = tmp_path / "checkpoint"
    save_for_hf(model, folder, safe_serialization=True)
    for repo in ("someone/resnet18_castream.cub", model.pretrained_cfg["hf_hub_id"]):  # offline, from the cache
        add_to_hf_cache(folder, repo)
    expected = sha256(folder / "model.safetensors")
    for weights in (str(folder), f"local-dir:{folder}", str(folder / "model.safetensors"),
                    "someone/resnet18_castream.cub", "hf-hub:someone/resnet18_castream.cub", "default",
                    "resnet18_castream.in1k"):
        assert sha256(resolve_weights("resnet18_castream", weights).file) == expected
    with pytest.raises(FileNotFoundError, match="weights file .*missing.safetensors not found"):
        resolve_weights("resnet18_castream", str(tmp_path / "missing.safetensors"))


def test_random_initialisation_has_no_weights_hash(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    _, results = run(tmp_path, *cub_args(tmp_path / "data", "--methods", "fakecam", "--metrics", "faithfulness"))
    assert results["protocol"]["weights"] is None and results["protocol"]["weights_sha256"] is None


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_with_batch_0(path):
    path.write_bytes((path.parent / "000000.safetensors").read_bytes())


def without_a_metric(path):
    """The batch as a run that did not compute AD (or cached it under another key) would have left it."""
    record = load_file(path)
    del record["row/gradcam/AD"]
    save_file(record, path)


DAMAGES = {  # a bad-input table: what can happen to a cached batch
    "truncated": truncate,
    "not safetensors": lambda path: path.write_bytes(b"\x00" * 64),
    "empty": lambda path: path.write_bytes(b""),
    "another batch's images": overwrite_with_batch_0,
    "without a method's results": lambda path: save_file({"image/index": torch.tensor([2, 3])}, path),
    "without a metric's values": without_a_metric,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_batch_is_named_and_computed_again(tmp_path, capsys, damage):
    make_cub(tmp_path / "data", images=CUB_TEST)
    args = cub_args(tmp_path / "data", "--methods", "gradcam", "--metrics", "faithfulness")
    run_dir, clean = run(tmp_path, *args)
    damaged = run_dir / "batches" / "000001.safetensors"
    DAMAGES[damage](damaged)
    (run_dir / "results.json").unlink()  # an interrupted run, continued
    capsys.readouterr()
    _, resumed = run(tmp_path, *args)
    notices = [line for line in capsys.readouterr().out.splitlines() if str(damaged) in line]
    assert len(notices) == 1 and "computing it again" in notices[0]
    assert scores(resumed) == scores(clean) and resumed["images"] == clean["images"]


def test_a_full_disk_names_the_batch_and_keeps_the_batches_written(tmp_path, monkeypatch):
    make_cub(tmp_path / "data", images=CUB_TEST)
    args = cub_args(tmp_path / "data", "--methods", "gradcam", "--metrics", "faithfulness")
    _, clean = run(tmp_path / "clean", *args)
    writes = []

    def full_after_one(record, path):
        writes.append(path)
        if len(writes) > 1:
            Path(path).write_bytes(b"\x00" * 8)  # what a full disk leaves of the file
            raise SafetensorError("Error while serializing: No space left on device (os error 28)")
        save_file(record, path)

    monkeypatch.setattr(harness, "save_file", full_after_one)
    with pytest.raises(OSError, match=r"could not write .*000001\.safetensors \(.*No space left on device"):
        run(tmp_path, *args)
    (run_dir,) = (tmp_path / "out").iterdir()
    assert sorted(path.name for path in (run_dir / "batches").iterdir()) == ["000000.safetensors"]
    monkeypatch.undo()
    _, resumed = run(tmp_path, *args)
    assert scores(resumed) == scores(clean)


def test_a_damaged_results_file_is_written_again(tmp_path, capsys):
    make_cub(tmp_path / "data", images=CUB_TEST)
    args = cub_args(tmp_path / "data", "--methods", "gradcam", "--metrics", "faithfulness")
    run_dir, clean = run(tmp_path, *args)
    truncate(run_dir / "results.json")
    capsys.readouterr()
    _, again = run(tmp_path, *args)
    assert f"{run_dir / 'results.json'} is damaged" in capsys.readouterr().out
    assert scores(again) == scores(clean)


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-5"), ("--batch-size", "0"),
                                         ("--workers", "-1"), ("--img-size", "0")])
def test_bad_numbers_of_the_command_line_are_refused_before_anything_is_written(tmp_path, capsys, flag, value):
    make_cub(tmp_path / "data", images=CUB_TEST)
    with pytest.raises(SystemExit):
        main([*cub_args(tmp_path / "data", "--methods", "fakecam"), "--out", str(tmp_path / "out"), "--cpu",
              flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_empty_split_is_named_before_anything_is_written(tmp_path, capsys):
    make_cub(tmp_path / "data", images=(CubImage(1, True, (8, 8, 40, 30)),))  # no test image
    with pytest.raises(SystemExit):
        main([*cub_args(tmp_path / "data", "--methods", "fakecam"), "--out", str(tmp_path / "out"), "--cpu"])
    assert f"cub has no image in its test split at {tmp_path / 'data'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


BAD_OPTIONS = [  # a bad-input table: method, option, value, what the error says
    ("opticam", "iterations", -1, "opticam iterations must be an integer >= 0, got -1"),
    ("opticam", "iterations", 2.5, "opticam iterations must be an integer >= 0, got 2.5"),
    ("opticam", "iterations", "ten", "opticam iterations must be an integer >= 0, got 'ten'"),
    ("opticam", "iterations", True, "opticam iterations must be an integer >= 0, got True"),
    ("opticam", "lr", 0, "opticam lr must be a number > 0, got 0"),
    ("opticam", "lr", float("nan"), "opticam lr must be a number > 0, got nan"),
    ("opticam", "lr", float("inf"), "opticam lr must be a number > 0, got inf"),
    ("opticam", "tolerance", -1e-3, "opticam tolerance must be a number >= 0, got -0.001"),
    ("opticam", "objective", "max", "opticam objective must be one of 'mask', 'diff', got 'max'"),
    ("scorecam", "batch_size", 0, "scorecam batch_size must be an integer >= 1, got 0"),
    ("ablationcam", "batch_size", -3, "ablationcam batch_size must be an integer >= 1, got -3"),
]


@pytest.mark.parametrize("method, option, value, message", BAD_OPTIONS)
def test_bad_method_options_are_named_by_explain(method, option, value, message):
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=f"^{message}"):
        explain(model, torch.randn(1, 3, 32, 32), method, **{option: value})


@pytest.mark.parametrize("method, option, value, message", [BAD_OPTIONS[i] for i in (0, 4, 8, -1)])
def test_bad_method_options_are_refused_by_the_harness_before_anything_is_written(tmp_path, capsys, method, option,
                                                                                   value, message):
    make_cub(tmp_path / "data", images=CUB_TEST)
    with pytest.raises(SystemExit):
        main([*cub_args(tmp_path / "data", "--methods", method), "--option", f"{method}.{option}={value}",
              "--out", str(tmp_path / "out"), "--cpu"])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def nan_model():
    """A ResNet-18 whose every output is NaN (one NaN weight in its first convolution)."""
    model = timm.create_model("resnet18", num_classes=3).eval()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    return model


MODEL_METHODS = sorted(name for name in METHODS if name not in ("fakecam", "attention", "rawattention", "rawatt",
                                                                "rollout", "generic_attention", "tibav", "chefer"))


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_a_model_with_non_finite_outputs_is_named_by_explain(method):
    options = {"iterations": 2} if method == "opticam" else {}
    with pytest.raises(ValueError, match="outputs of resnet18 are not finite"):
        explain(nan_model(), torch.randn(2, 3, 32, 32), method, **options)


@pytest.mark.parametrize("pixel", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images_are_refused_by_explain(pixel):
    images = torch.randn(2, 3, 32, 32)
    images[1, 2, 5, 7] = pixel
    with pytest.raises(ValueError, match=r"images for resnet18 are not finite \(NaN or Inf\) at batch positions 1$"):
        explain(timm.create_model("resnet18", num_classes=3), images, "gradcam")


def cub_protocol(root, **changes):
    config = dict(input_size=(3, 64, 64), interpolation="bilinear", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))
    fields = dict(model="resnet18", weights=None, num_classes=3, dataset="cub", data_root=str(root), split="test",
                  limit=None, methods=["gradcam"], metrics=["faithfulness"], batch_size=2, data_config=config)
    return Protocol(**{**fields, **changes})


def test_an_unknown_way_to_read_probabilities_is_refused_before_anything_is_written(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    dataset = build_dataset("cub", tmp_path / "data", "test")
    with pytest.raises(ValueError, match="probabilities must be one of softmax, sigmoid, got 'logit'"):
        run_protocol(cub_protocol(tmp_path / "data", probabilities="logit"), dataset, tmp_path / "out",
                     Accelerator(cpu=True))
    assert not (tmp_path / "out").exists()


def test_localisation_on_a_dataset_without_boxes_is_refused_before_anything_is_written(tmp_path):
    make_image_folder(tmp_path / "data")
    dataset = build_dataset("imagenet-folder", tmp_path / "data", "val")
    protocol = cub_protocol(tmp_path / "data", dataset="imagenet-folder", split="val", num_classes=2,
                            metrics=["faithfulness", "localisation"])
    with pytest.raises(ValueError, match=r"^imagenet-folder \(val split at .*\) has no ground-truth boxes, which "
                                         "the localisation metrics need"):
        run_protocol(protocol, dataset, tmp_path / "out", Accelerator(cpu=True))
    assert not (tmp_path / "out").exists()


def test_non_finite_images_are_refused_by_the_harness(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    protocol = cub_protocol(tmp_path / "data")
    protocol.data_config["mean"] = (0.485, float("nan"), 0.406)  # a broken normalisation
    dataset = build_dataset("cub", tmp_path / "data", "test")
    with pytest.raises(ValueError, match=r"images 0, 1 of cub \(test\) are not finite after preprocessing"):
        run_protocol(protocol, dataset, tmp_path / "out", Accelerator(cpu=True))


def test_a_model_with_non_finite_outputs_is_refused_by_the_harness(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    weights = tmp_path / "nan.safetensors"
    save_file(nan_model().state_dict(), weights)
    dataset = build_dataset("cub", tmp_path / "data", "test")
    with pytest.raises(ValueError, match=r"outputs of resnet18 are not finite \(NaN or Inf\) for images 0, 1 of cub"):
        run_protocol(cub_protocol(tmp_path / "data", weights=str(weights)), dataset, tmp_path / "out",
                     Accelerator(cpu=True))
