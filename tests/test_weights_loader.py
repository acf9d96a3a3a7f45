"""One loader for weights everywhere (zoo-eval, zoo-train's starting weights, the demo), named as timm names them,
with a checkpoint's model arguments and preprocessing honoured; offline, from folders and a Hub cache on disk."""

import json

import pytest
import timm
import torch
from data_layouts import make_cub
from safetensors.torch import load_file
from test_harness import CUB_TEST, scores
from timm.data import resolve_data_config
from timm.models import save_for_hf

from zoo.evaluation.harness import main
from zoo.hub import add_to_hf_cache, load_model, resolve_weights, sha256

RUN_ARGS = dict(kv_proj=True, channels=[8, 16, 32, 64], stem_width=8)  # a tiny CA-Stream with PROJ->CA blocks
RUN_DATA = dict(input_size=(3, 96, 96), interpolation="bilinear", crop_pct=1.0, mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25))
X = torch.randn(2, 3, 96, 96)


def trained_run(run):
    """``<run>/model`` as zoo-train exports a 3-class run at 96 px: timm's save_for_hf with the model's arguments
    and the data config it trained with."""
    model = timm.create_model("resnet18_castream", num_classes=3, **RUN_ARGS).eval()
    save_for_hf(model, run / "model", safe_serialization=True, model_config=dict(num_classes=3),
                model_args=RUN_ARGS, data_config=RUN_DATA)
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model_args"]["kv_proj"] is True and config["pretrained_cfg"]["input_size"] == [3, 96, 96]
    return model


def evaluate(tmp_path, out, weights, *args):
    main(["resnet18_castream", "--weights", weights, "--dataset", "cub", "--data-root", str(tmp_path / "data"),
          "--methods", "fakecam", "--metrics", "faithfulness", "--batch-size", "2", "--limit", "2", "--cpu",
          "--out", str(out), *args])
    (run_dir,) = out.iterdir()
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_zoo_eval_evaluates_a_run_folder_with_its_own_arguments_and_input_size(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    trained_run(tmp_path / "run")
    file = tmp_path / "run" / "model" / "model.safetensors"
    run_dir, results = evaluate(tmp_path, tmp_path / "local", f"local-dir:{tmp_path / 'run' / 'model'}",
                                "--model-kwargs", "drop_rate=0.25")
    protocol = results["protocol"]
    assert protocol["weights_sha256"] == sha256(file)
    assert protocol["model_args"] == {**RUN_ARGS, "taps": "authors", "in_chans": 3, "drop_rate": 0.25}
    assert protocol["data_config"] == json.loads(json.dumps(RUN_DATA))  # no --img-size: the run's own
    assert load_file(run_dir / "batches" / "000000.safetensors")["example/images"].shape[-2:] == (96, 96)
    # the same checkpoint through an offline Hub cache, by timm's hf-hub: name
    add_to_hf_cache(tmp_path / "run" / "model", "someone/cub-castream")
    _, from_hub = evaluate(tmp_path, tmp_path / "hub", "hf-hub:someone/cub-castream")
    assert from_hub["protocol"]["weights_sha256"] == protocol["weights_sha256"]
    hub_args = from_hub["protocol"]["model_args"]
    assert hub_args["kv_proj"] is True and "drop_rate" not in hub_args
    assert from_hub["protocol"]["data_config"] == protocol["data_config"]
    assert scores(from_hub) == scores(results)  # dropout is off in evaluation


def test_an_explicit_image_size_wins_over_the_checkpoints(tmp_path):
    make_cub(tmp_path / "data", images=CUB_TEST)
    trained_run(tmp_path / "run")
    _, results = evaluate(tmp_path, tmp_path / "out", str(tmp_path / "run" / "model"), "--img-size", "64")
    assert results["protocol"]["data_config"]["input_size"] == [3, 64, 64]
    assert results["protocol"]["data_config"]["mean"] == [0.5, 0.5, 0.5]  # the rest stays the checkpoint's


def test_every_name_of_a_checkpoint_loads_the_same_model_with_its_preprocessing(tmp_path):
    model = trained_run(tmp_path / "run")
    folder = tmp_path / "run" / "model"
    add_to_hf_cache(folder, "someone/cub-castream")
    for weights in (f"local-dir:{folder}", str(folder), "hf-hub:someone/cub-castream", "someone/cub-castream"):
        loaded = load_model("resnet18_castream", weights, 3).eval()  # as zoo-train's build_model calls it
        assert loaded.stream.blocks[0].key is not None  # kv_proj from config.json
        assert resolve_data_config({}, model=loaded)["input_size"] == (3, 96, 96)  # what zoo-train's set_up reads
        with torch.no_grad():
            assert torch.equal(loaded(X).logits, model(X).logits)
    with pytest.raises(ValueError, match="unexpected keys"):  # explicit arguments win over the checkpoint's
        load_model("resnet18_castream", f"local-dir:{folder}", 3, kv_proj=False)


def test_a_registered_tag_loads_its_safetensors_and_an_unknown_tag_is_named(tmp_path):
    backbone = timm.create_model("resnet18", channels=[8, 16, 32, 64], stem_width=8)
    save_for_hf(backbone, tmp_path / "tv", safe_serialization=True)
    add_to_hf_cache(tmp_path / "tv", "timm/resnet18.tv_in1k")
    weights = resolve_weights("resnet18_castream", "resnet18.tv_in1k")
    assert weights.file.read_bytes() == (tmp_path / "tv" / "model.safetensors").read_bytes()
    assert weights.architecture == "resnet18" and weights.data_cfg["crop_pct"] == 0.875
    assert weights.model_args_for("resnet18_castream", kv_proj=True) == {"kv_proj": True}
    with pytest.raises(ValueError, match=r"weights 'resnet18\.nonexistent_tag': .*timm.list_pretrained"):
        resolve_weights("resnet18", "resnet18.nonexistent_tag")
    with pytest.raises(FileNotFoundError, match="no folder"):
        resolve_weights("resnet18", f"local-dir:{tmp_path / 'missing'}")


@pytest.mark.parametrize("kwargs, message", [
    (["img_size"], "expected KEY=VALUE"),
    (["num_classes=3"], "num_classes is the dataset's class count"),
])
def test_bad_model_kwargs_are_named(tmp_path, capsys, kwargs, message):
    with pytest.raises(SystemExit):
        main(["resnet18", "--dataset", "cub", "--data-root", str(tmp_path), "--model-kwargs", *kwargs])
    assert message in capsys.readouterr().err
