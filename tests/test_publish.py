"""zoo-publish: the Hub folder loads back offline as saved, re-publishing keeps metadata, one commit, integrity."""

import json
import shutil
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from test_model_cards import assert_model_index_is_the_results, write_results
from timm.models import save_for_hf

import zoo.evaluation.publish
from zoo.evaluation.model_card import regenerate
from zoo.evaluation.publish import main
from zoo.hub import CheckpointError, add_to_hf_cache, load_model, sha256

X = torch.randn(2, 3, 64, 64)
SMALL = dict(backbone="resnet10t")  # a small CA-Stream, random-initialised
REPO = "someone/resnet18_castream.cub"


def save_checkpoint(folder):
    """A trained model's folder, as a training run writes it (random weights)."""
    model = timm.create_model("resnet18_castream", num_classes=3, **SMALL).eval()
    save_for_hf(model, folder, safe_serialization=True, model_args=SMALL,
                model_config=dict(label_names=["albatross", "gull", "tern"], num_classes=3))
    return folder


@pytest.fixture
def model_dir(tmp_path):
    return save_checkpoint(tmp_path / "model")


def results_of(model_dir, runs, **changes):
    """A zoo-eval results file of the checkpoint in ``model_dir``, recording its weights' SHA-256."""
    return write_results(runs, weights=str(model_dir), weights_sha256=sha256(model_dir / "model.safetensors"),
                         **changes)


def publish(model_dir, out, *results, extra=()):
    listed = ["--results", *map(str, results)] if results else []
    main([str(model_dir), REPO, *listed, "--out", str(out), "--dry-run", *extra])
    return out


def assert_same_outputs(a, b):
    out_a, out_b = a.eval()(X), b.eval()(X)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.saliency, out_b.saliency)


def test_published_folder_loads_back_offline_as_saved(tmp_path, model_dir):
    results = results_of(model_dir, tmp_path / "runs")
    out = publish(model_dir, tmp_path / "hub", results)
    stem = f"results/cub-{json.loads(results.read_text())['key']}"
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == {
        "README.md", "config.json", "model.safetensors", ".zoo-card", f"{stem}.json", f"{stem}.png"}  # safetensors only
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18_castream" and config["num_classes"] == 3
    assert config["label_names"] == ["albatross", "gull", "tern"] and config["model_args"]["backbone"] == "resnet10t"
    assert config["pretrained_cfg"]["hf_hub_filename"] == "model.safetensors"
    add_to_hf_cache(out, REPO)
    saved = timm.create_model("local-dir:" + str(model_dir), pretrained=True)
    assert_same_outputs(saved, timm.create_model("resnet18_castream", pretrained=True, num_classes=3, **SMALL,
                                                 pretrained_cfg_overlay=dict(hf_hub_id=REPO, num_classes=3)))
    assert_same_outputs(saved, timm.create_model(f"hf-hub:{REPO}", pretrained=True))
    assert_same_outputs(saved, load_model("resnet18_castream", REPO, 3, **SMALL))  # the harness' and training's loader
    assert_model_index_is_the_results(out)


def test_republishing_updates_the_metrics_and_keeps_the_other_metadata(tmp_path, model_dir):
    out = publish(model_dir, tmp_path / "hub", results_of(model_dir, tmp_path / "runs"),
                  extra=["--base-model", "timm/resnet10t.c3_in1k"])
    card = ModelCard.load(out / "README.md")
    card.data.tags.append("birds")  # edited by hand, or on the Hub
    card.data.widget = [{"src": "albatross.jpg"}]
    card.save(out / "README.md")
    new = results_of(model_dir, tmp_path / "runs", limit=4)
    with pytest.raises(FileExistsError, match="--overwrite"):
        publish(model_dir, out, new)
    publish(model_dir, out, new, extra=["--overwrite"])
    card = ModelCard.load(out / "README.md")
    assert "birds" in card.data.tags and card.data.widget == [{"src": "albatross.jpg"}]
    assert card.data.base_model == "timm/resnet10t.c3_in1k"
    assert [p.name for p in (out / "results").glob("*.json")] == [f"cub-{json.loads(new.read_text())['key']}.json"]
    assert_model_index_is_the_results(out)


def test_kept_card_regenerates_as_published(tmp_path, model_dir):
    results = results_of(model_dir, tmp_path / "runs")
    main([str(model_dir), "resnet18_castream.cub", "--results", str(results), "--out", str(tmp_path / "hub"),
          "--dry-run", "--cards", str(tmp_path / "cards")])
    kept = tmp_path / "cards" / "resnet18_castream.cub"
    assert not (kept / "model.safetensors").exists()
    assert (kept / "README.md").read_bytes() == (tmp_path / "hub" / "README.md").read_bytes()
    regenerate(tmp_path / "cards")
    assert (kept / "README.md").read_bytes() == (tmp_path / "hub" / "README.md").read_bytes()
    with pytest.raises(SystemExit):
        main([str(model_dir), REPO, "--out", str(tmp_path / "other"), "--dry-run", "--cards", str(tmp_path / "cards")])


class FakeHub:
    """HfApi's calls zoo-publish makes, recorded; the repository exists with a card holding extra metadata."""

    calls = []

    def __init__(self, card_path):
        self.card_path = card_path

    def create_repo(self, repo_id, exist_ok, private):
        self.calls.append(("create_repo", repo_id, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def hf_hub_download(self, repo_id, filename):
        if self.card_path is None:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(self.card_path)

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns, delete_patterns):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in folder_path.rglob("*") if p.is_file()
                 and not any(p.match(pattern) for pattern in ignore_patterns)}
        self.calls.append(("upload_folder", repo_id, files, delete_patterns))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


def test_upload_is_one_commit_and_never_holds_the_token(tmp_path, model_dir, monkeypatch, capsys):
    token = "hf_NotARealTokenButSecret"
    monkeypatch.setenv("HF_TOKEN", token)
    on_hub = tmp_path / "hub_card.md"
    on_hub.write_text("---\nlicense: apache-2.0\nlanguage: en\n---\nold card\n")
    monkeypatch.setattr(FakeHub, "calls", [])
    monkeypatch.setattr(zoo.evaluation.publish, "HfApi", lambda: FakeHub(on_hub))
    main([str(model_dir), REPO, "--results", str(results_of(model_dir, tmp_path / "runs"))])
    (create, upload) = FakeHub.calls
    assert create == ("create_repo", REPO, True) and upload[0] == "upload_folder"
    files = upload[2]
    assert {"README.md", "config.json", "model.safetensors"} <= set(files) and ".zoo-card" not in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "results/*" in upload[3] and "*.bin" in upload[3]  # stale results and pickles leave in the same commit
    assert all(token.encode() not in content for content in files.values())
    assert token not in "".join(capsys.readouterr())
    card = ModelCard(files["README.md"].decode())
    assert card.data.language == "en" and card.data.license == "apache-2.0"  # kept: no run recorded another


@pytest.fixture
def published(tmp_path, model_dir):
    return publish(model_dir, tmp_path / "hub")


def corrupt(folder, how):
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "tampered":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        config.write_text(config.read_text().replace('"architecture": "resnet18_castream"',
                                                      '"architecture": "resnet18_nonexistent"'))


@pytest.mark.parametrize("how, message", [
    ("truncated", r"is not a complete safetensors file .*truncated or corrupted"),
    ("tampered", r"does not match the SHA-256 recorded in its config.json"),
    ("unknown", r"names the architecture 'resnet18_nonexistent', which timm does not know"),
])
def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, published, how, message):
    corrupt(published, how)
    with pytest.raises(CheckpointError, match=message):
        load_model("resnet18_castream", str(published), 3, **SMALL)
    add_to_hf_cache(published, "someone/damaged")
    with pytest.raises(CheckpointError, match=message):
        load_model("resnet18_castream", "someone/damaged", 3, **SMALL)
    with pytest.raises(CheckpointError, match=message):  # nor is it published again
        main([str(published), REPO, "--out", str(tmp_path / "again"), "--dry-run"])


def test_pickled_weights_are_never_loaded_from_the_hub(tmp_path, published):
    pickled = tmp_path / "pickled"
    shutil.copytree(published, pickled)
    model = timm.create_model("resnet18_castream", num_classes=3, **SMALL)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    add_to_hf_cache(pickled, "someone/pickled")
    with pytest.raises(CheckpointError, match=r"has no model.safetensors .*never pickled ones"):
        load_model("resnet18_castream", "someone/pickled", 3, **SMALL)
    with pytest.raises(CheckpointError, match=r"has no model.safetensors .*never pickled ones"):  # timm's hf-hub: too
        timm.create_model("hf-hub:someone/pickled", pretrained=True)
    with pytest.raises(CheckpointError, match=r"holds no model.safetensors; pickled weights \(pytorch_model.bin\)"):
        main([str(pickled), REPO, "--out", str(tmp_path / "again"), "--dry-run"])
