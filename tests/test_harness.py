"""The evaluation harness end to end on datasets laid out on disk as the real ones are."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import torch
from data_layouts import CubImage, make_cub, make_image_folder, make_voc
from safetensors.torch import load_file
from timm.models import save_for_hf

from zoo.data import build_dataset
from zoo.data.photo import photo
from zoo.evaluation import harness
from zoo.evaluation.harness import Protocol, compare_main, comparison, main
from zoo.training.train import subset

CUB_TEST = tuple(CubImage(1 + i % 3, False, (8 + 4 * i, 8, 40, 30 + 2 * i)) for i in range(5))
FAST = ["--img-size", "64", "--batch-size", "2", "--cpu"]


def scores(results):
    """Every number of a run but its timings."""
    return {method: {k: v for k, v in values.items() if k != "seconds_per_image"}
            for method, values in results["methods"].items()}


def run(tmp_path, *args):
    main([*args, "--out", str(tmp_path / "out"), *FAST])
    (run_dir,) = (tmp_path / "out").iterdir()
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_cub_run_writes_every_result_with_its_protocol(tmp_path, capsys):
    make_cub(tmp_path / "data", images=CUB_TEST)
    run_dir, results = run(tmp_path, "resnet18_castream", "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                           "--methods", "gradcam", "attention", "fakecam", "box", "box_complement",
                           "--metrics", "faithfulness", "curves", "adcc", "localisation")
    assert results["images"] == results["explanations"] == 5
    assert results["protocol"]["split"] == "test" and results["protocol"]["num_classes"] == 3
    assert results["protocol"]["targets"] == "ground-truth" and results["protocol"]["curves"] == "released"
    assert set(results["recognition"]) == {"top1"}  # three classes: no top-5
    methods = results["methods"]
    for name in ("gradcam", "attention", "fakecam"):
        assert {"AD", "AG", "AI", "I", "D", "ADCC", "OM", "LE", "F1", "BA", "SP", "EP", "SM"} <= set(methods[name])
    # sanity baselines: Fake-CAM barely changes the probabilities; the box itself localises perfectly
    assert methods["fakecam"]["AD"] < 1 and methods["fakecam"]["AG"] < 1
    assert methods["box"]["LE"] < 5 and methods["box"]["SP"] == 100 and methods["box"]["F1"] == 100  # pixel-snapped
    assert methods["box_complement"]["LE"] > 50 and methods["box_complement"]["SP"] == 0
    table = (run_dir / "results.md").read_text()
    assert "| method | AD↓ | AG↑ | AI↑ | I↑ | D↓ | ADCC↑ | s/image |" in table
    assert "| method | OM↓ | LE↓ | F1↑ | BA↑ | SP↑ | EP↑ | SM↓ | RRA↑ | s/image |" in table
    assert (run_dir / "examples.png").stat().st_size > 0
    assert json.loads((run_dir / "protocol.json").read_text()) == results["protocol"]
    assert str(run_dir) in capsys.readouterr().out


def test_an_interrupted_run_continues_and_nothing_is_overwritten(tmp_path, capsys):
    make_cub(tmp_path / "data", images=CUB_TEST)
    args = ["resnet18", "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--methods", "gradcam",
            "--metrics", "faithfulness"]
    run_dir, first = run(tmp_path, *args)
    batches = sorted((run_dir / "batches").iterdir())
    assert [b.name for b in batches] == ["000000.safetensors", "000001.safetensors", "000002.safetensors"]
    # an interruption: the last batch and the results are missing
    batches[-1].unlink()
    (run_dir / "results.json").unlink()
    kept = {b: b.stat().st_mtime_ns for b in batches[:-1]}
    _, resumed = run(tmp_path, *args)
    assert {b: b.stat().st_mtime_ns for b in batches[:-1]} == kept  # cached batches were not recomputed
    assert scores(resumed) == scores(first)
    capsys.readouterr()
    main([*args, "--out", str(tmp_path / "out"), *FAST])  # same protocol again: left as it is
    assert "already holds the results" in capsys.readouterr().out
    main([*args, "--targets", "predicted", "--out", str(tmp_path / "out"), *FAST])  # another protocol
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_voc_explains_every_positive_class_and_reports_map(tmp_path):
    make_voc(tmp_path / "data")
    _, results = run(tmp_path, "resnet18", "--dataset", "voc", "--data-root", str(tmp_path / "data"),
                     "--split", "trainval", "--methods", "gradcam", "box", "--metrics", "faithfulness",
                     "localisation")
    assert results["protocol"]["num_classes"] == 20
    assert results["explanations"] > results["images"] == 3
    assert set(results["recognition"]) == {"mAP"}
    assert "OM" not in results["methods"]["gradcam"]  # OM is for single-label datasets
    assert results["methods"]["box"]["SP"] == 100


def test_method_options_reach_the_method_and_are_recorded(tmp_path):
    make_image_folder(tmp_path / "data")
    _, results = run(tmp_path, "resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"),
                     "--methods", "scorecam", "--option", "scorecam.amp_dtype=bfloat16", "--metrics", "faithfulness",
                     "--limit", "2")
    assert results["protocol"]["method_options"] == {"scorecam": {"amp_dtype": "bfloat16"}}
    with pytest.raises(ValueError, match="amp_dtype must be one of bfloat16, float16"):
        run(tmp_path / "bad", "resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"),
            "--methods", "scorecam", "--option", "scorecam.amp_dtype=int8", "--metrics", "faithfulness", "--limit", "2")


def test_localisation_asked_of_a_dataset_without_boxes_is_refused(tmp_path, capsys):
    make_image_folder(tmp_path / "data")
    with pytest.raises(SystemExit):
        main(["resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"), "--methods",
              "fakecam", "--metrics", "faithfulness", "localisation", "--out", str(tmp_path / "out"), *FAST])
    error = capsys.readouterr().err
    assert "imagenet-folder (val split at" in error
    assert "has no ground-truth boxes, which the localisation metrics need: leave them out of --metrics" in error
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_boxes_skips_localisation_by_default(tmp_path, capsys):
    make_image_folder(tmp_path / "data")
    _, results = run(tmp_path, "resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"),
                     "--methods", "fakecam", "--limit", "1")
    assert "LE" not in results["methods"]["fakecam"] and "localisation" not in results["protocol"]["metrics"]
    assert "has no ground-truth boxes" in capsys.readouterr().out


def test_limit_takes_the_sample_zoo_train_takes_across_a_class_sorted_split(tmp_path):
    make_image_folder(tmp_path / "data", per_class=4)  # val: 4 images of one class, then 4 of the other
    run_dir, results = run(tmp_path, "resnet18", "--dataset", "imagenet-folder", "--data-root",
                           str(tmp_path / "data"), "--methods", "fakecam", "--metrics", "faithfulness", "--limit", "4")
    batches = [load_file(path) for path in sorted((run_dir / "batches").iterdir())]
    images = [i for batch in batches for i in batch["image/index"].tolist()]
    assert images == list(subset(build_dataset("imagenet-folder", tmp_path / "data", "val"), 4, seed=0).indices)
    assert {label for batch in batches for label in batch["image/labels"].tolist()} == {0, 1}
    assert results["images"] == 4


def fake_result(model, sha, key, ad):
    return {"protocol": {"model": model, "weights_sha256": sha}, "key": key,
            "methods": {"gradcam": {"AD": ad, "seconds_per_image": 0.1}}}


def test_runs_of_one_architecture_are_told_apart_in_the_table():
    results = [fake_result("resnet18", "ab" * 32, "k1", 1.0), fake_result("resnet18", "cd" * 32, "k2", 2.0),
               fake_result("resnet18", "cd" * 32, "k3", 3.0), fake_result("resnet18", None, "k4", 4.0),
               fake_result("vit_small", "ef" * 32, "k5", 5.0)]
    rows = [line for line in comparison(results).splitlines() if line.startswith("| gradcam")]
    assert rows == ["| gradcam | resnet18 (weights abababab) | 1.00 |",
                    "| gradcam | resnet18 (weights cdcdcdcd) (run k2) | 2.00 |",
                    "| gradcam | resnet18 (weights cdcdcdcd) (run k3) | 3.00 |",
                    "| gradcam | resnet18 (random init) | 4.00 |", "| gradcam | vit_small | 5.00 |"]
    header = next(line for line in comparison(results[:2], by_model=True).splitlines() if line.startswith("| method"))
    assert header == "| method | resnet18 (weights abababab) AD↓ | resnet18 (weights abababab) T | " \
                     "resnet18 (weights cdcdcdcd) AD↓ | resnet18 (weights cdcdcdcd) T |"


@pytest.mark.parametrize("args, message", [
    (["--methods", "gradcamm"], "unknown methods gradcamm"),
    (["--methods", "box"], "has no ground-truth boxes for box"),
    (["--option", "opticam-iterations"], "expected METHOD.OPTION=VALUE"),
])
def test_bad_requests_are_named(tmp_path, capsys, args, message):
    make_image_folder(tmp_path / "data")
    with pytest.raises(SystemExit):
        main(["resnet18", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"), *args])
    assert message in capsys.readouterr().err


def test_missing_dataset_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        main(["resnet18", "--dataset", "cub", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])


def test_two_processes_share_the_batches(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    args = ["resnet18", "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--methods", "gradcam",
            "--metrics", "faithfulness", *FAST]
    _, single = run(tmp_path / "single", *args)
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                    "zoo.evaluation.harness", *args, "--out", str(tmp_path / "two" / "out")], check=True, cwd=tmp_path)
    (run_dir,) = (tmp_path / "two" / "out").iterdir()
    assert scores(json.loads((run_dir / "results.json").read_text())) == scores(single)


def test_runs_compare_side_by_side(tmp_path, capsys):
    make_cub(tmp_path / "data", images=CUB_TEST)
    common = ["--dataset", "cub", "--data-root", str(tmp_path / "data"), "--methods", "gradcam", "fakecam",
              "--metrics", "faithfulness"]
    gap_dir, gap = run(tmp_path / "gap", "resnet18", *common)
    ca_dir, ca = run(tmp_path / "ca", "resnet18_castream", *common)
    capsys.readouterr()
    compare_main([str(gap_dir / "results.json"), str(ca_dir / "results.json")])
    table = capsys.readouterr().out
    assert "| method | model | AD↓ | AG↑ | AI↑ |" in table
    rows = [line for line in table.splitlines() if line.startswith("| gradcam")]
    assert rows == [f"| gradcam | {r['protocol']['model']} | {r['methods']['gradcam']['AD']:.2f} | "
                    f"{r['methods']['gradcam']['AG']:.2f} | {r['methods']['gradcam']['AI']:.2f} |" for r in (gap, ca)]


def per_image(run_dir, key):
    return torch.cat([load_file(path)[key] for path in sorted((run_dir / "batches").iterdir())])


def test_a_float32_protocol_keeps_the_name_it_had_before_precision_was_recorded():
    protocol = Protocol(model="resnet18", weights=None, num_classes=10, dataset="imagenet-folder", data_root="/data",
                        split="val", limit=4, methods=["gradcam", "scorecam"],
                        method_options={"scorecam": {"batch_size": 16}}, probabilities="softmax")
    assert protocol.key() == "7de3fad47815"  # computed by the harness of commit 6ea4652, before the field existed
    assert replace(protocol, precision="bfloat16").key() != protocol.key()


def confident_checkpoint(folder, classes: int):
    """A random ResNet-18 whose classifier is scaled up so that its probabilities spread as a trained model's do
    (a random one's are all near 1 / classes, where AD and AG are zero on any path), saved as zoo-train exports."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=classes)
    with torch.no_grad():
        model.fc.weight *= 10
    save_for_hf(model, folder, safe_serialization=True, model_config=dict(num_classes=classes))
    return f"local-dir:{folder}"


def photo_folder(root, classes: int = 2, per_class: int = 2):
    """An ImageNet-style folder of distinct crops of a real photograph."""
    picture = photo()
    for index in range(classes * per_class):
        path = root / "val" / f"class{index % classes}" / f"{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        left, top = 37 * index, 53 * index
        picture.crop((left, top, left + 300, top + 300)).save(path, quality=90)
    return root


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU's fast path needs a GPU"))])
def test_the_fast_path_agrees_with_the_exact_one_and_results_say_which_ran(tmp_path, monkeypatch, device):
    photo_folder(tmp_path / "data")
    args = ["resnet18", "--weights", confident_checkpoint(tmp_path / "model", 2), "--dataset", "imagenet-folder",
            "--data-root", str(tmp_path / "data"), "--methods", "scorecam", "opticam", "--option",
            "opticam.iterations=3", "--metrics", "faithfulness", "curves", "--limit", "2",
            *(flag for flag in FAST if device == "cpu" or flag != "--cpu")]

    def evaluate(folder, *flags):
        main([*args, *flags, "--out", str(folder)])
        (run_dir,) = folder.iterdir()
        return run_dir, json.loads((run_dir / "results.json").read_text())

    assert harness.default_precision(torch.device("cpu")) == "float32"
    if device == "cpu":
        monkeypatch.setattr(harness, "default_precision", lambda device: "bfloat16")  # what a GPU with bfloat16 gets
    exact_dir, exact = evaluate(tmp_path / "exact", "--exact")  # --exact wins over the default
    fast_dir, fast = evaluate(tmp_path / "fast")
    assert (exact["protocol"]["precision"], fast["protocol"]["precision"]) == ("float32", "bfloat16")
    assert fast["protocol"]["method_options"] == {"opticam": {"iterations": 3, "amp_dtype": "bfloat16"},
                                                  "scorecam": {"amp_dtype": "bfloat16"}}
    assert "precision: bfloat16 (the fast path)" in (fast_dir / "results.md").read_text()
    # the tolerances PRECISIONS refers to (measured here, 2026-12-04: AD 3e-5, insertion/deletion 1.4e-3 at most)
    assert (per_image(exact_dir, "row/scorecam/AD") > 0.01).all()  # confident: the drops compared are not zeros
    for method in ("scorecam", "opticam"):
        for key in ("AD", "AG", "AI", "I", "D"):
            difference = per_image(fast_dir, f"row/{method}/{key}") - per_image(exact_dir, f"row/{method}/{key}")
            assert difference.abs().max() <= 0.005, (method, key, difference)
        maps = [load_file(folder / "batches" / "000000.safetensors")[f"example/{method}"] for folder in (exact_dir,
                                                                                                        fast_dir)]
        for exact_map, fast_map in zip(*maps, strict=True):
            assert torch.corrcoef(torch.stack([exact_map.flatten(), fast_map.flatten()]))[0, 1] > 0.99
