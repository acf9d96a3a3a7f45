"""Weights through timm's own loader, offline, from a Hugging Face cache built on disk."""

import huggingface_hub
import pytest
import timm
import torch
from timm.models import save_for_hf

from zoo.hub import CheckpointError, add_to_hf_cache, checkpoint_mismatch, verify_checkpoint

X = torch.randn(2, 3, 64, 64)


def saved(model, folder, **model_args):
    """A Hub folder as timm writes it: model.safetensors + config.json, no pickle."""
    save_for_hf(model, folder, safe_serialization=True, model_args=model_args or None)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


def assert_same_outputs(a, b, x=X):
    out_a, out_b = a.eval()(x), b.eval()(x)
    assert torch.equal(out_a.logits, out_b.logits)
    assert torch.equal(out_a.saliency, out_b.saliency)


def test_cache_layout_is_what_huggingface_hub_reads(tmp_path):
    snapshot = add_to_hf_cache(saved(timm.create_model("resnet18_castream"), tmp_path), "someone/layout-check")
    path = huggingface_hub.hf_hub_download("someone/layout-check", "model.safetensors")
    assert path == str(snapshot / "model.safetensors")
    repos = {repo.repo_id: repo for repo in huggingface_hub.scan_cache_dir().repos}
    assert {f.file_name for f in repos["someone/layout-check"].refs["main"].files} == {"config.json",
                                                                                        "model.safetensors"}


def test_pretrained_true_loads_the_default_tag_offline(tmp_path):
    model = timm.create_model("resnet18_castream")
    add_to_hf_cache(saved(model, tmp_path), model.pretrained_cfg["hf_hub_id"])
    assert_same_outputs(model, timm.create_model("resnet18_castream", pretrained=True))


def test_hub_id_overlay_and_hf_hub_name_load_offline(tmp_path):
    model = timm.create_model("convnext_small_castream", backbone="convnext_atto", num_classes=7)
    # construction arguments go into config.json (timm >= 1.0.31 records them itself)
    add_to_hf_cache(saved(model, tmp_path, backbone="convnext_atto", num_classes=7), "someone/castream-atto")
    overlay = dict(hf_hub_id="someone/castream-atto", num_classes=7)
    assert_same_outputs(model, timm.create_model("convnext_small_castream", backbone="convnext_atto", num_classes=7,
                                                 pretrained=True, pretrained_cfg_overlay=overlay))
    reloaded = timm.create_model("hf-hub:someone/castream-atto", pretrained=True)
    assert reloaded.num_classes == 7
    assert_same_outputs(model, reloaded)


def test_stream_training_starts_from_timm_backbone_weights(tmp_path):
    # timm's own tag for the backbone, as `resnet18.tv_in1k` would be downloaded
    backbone = timm.create_model("resnet18").eval()
    add_to_hf_cache(saved(backbone, tmp_path), "timm/resnet18.tv_in1k")
    model = timm.create_model("resnet18_castream", pretrained=True,
                              pretrained_cfg_overlay=dict(hf_hub_id="timm/resnet18.tv_in1k")).eval()
    assert torch.equal(model.backbone(X), backbone(X))
    # a new task: same features, new classifier
    cub = timm.create_model("resnet18_castream", num_classes=200, pretrained=True,
                            pretrained_cfg_overlay=dict(hf_hub_id="timm/resnet18.tv_in1k")).eval()
    assert torch.equal(cub.backbone.forward_features(X), backbone.forward_features(X))
    assert cub(X).logits.shape == (2, 200)


def test_stream_training_starts_from_a_local_backbone_file(tmp_path):
    backbone = timm.create_model("resnet18").eval()
    file = saved(backbone, tmp_path) / "model.safetensors"
    model = timm.create_model("resnet18_castream", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert torch.equal(model.eval().backbone(X), backbone(X))


def test_checkpoint_of_another_backbone_is_named(tmp_path):
    file = saved(timm.create_model("resnet18"), tmp_path) / "model.safetensors"
    with pytest.raises(ValueError, match=r"checkpoint does not fit resnet50_castream: \d+ missing keys .*"
                                         r"shape mismatches, checkpoint vs model \(e.g. backbone\.layer1"):
        timm.create_model("resnet50_castream", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))


def test_checkpoint_with_other_stream_options_is_named(tmp_path):
    file = saved(timm.create_model("resnet18_castream"), tmp_path) / "model.safetensors"
    with pytest.raises(ValueError, match=r"unexpected keys \(e.g. stream.blocks.1.*other stream options"):
        timm.create_model("resnet18_castream", stream_start=4, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(file)))


def test_missing_weights_say_where_they_were_looked_for():
    with pytest.raises(RuntimeError, match=r"(?s)no weights found for resnet50_castream at hf-hub:"
                       r"interpretable-zoo/resnet50_castream.in1k .*README's 'Weights'"):
        timm.create_model("resnet50_castream", pretrained=True)


def test_checkpoint_mismatch_counts_and_names_the_keys_that_do_not_fit():
    expected = {"a.weight": (2, 3), "a.bias": (2,), "bn.num_batches_tracked": (), "c": (1,), "d": (1,), "e": (1,),
                "f": (1,)}
    assert checkpoint_mismatch(expected, expected) == ""
    assert checkpoint_mismatch({"a.weight": (2, 3), "a.bias": (2,), "c": (1,), "d": (1,), "e": (1,), "f": (1,)},
                               expected) == ""  # BatchNorm counters may be missing
    found = {"a.weight": (3, 3), "a.bias": (4,), "z": (1,)}
    assert checkpoint_mismatch(found, expected) == (
        "4 missing keys (e.g. c, d, e); 1 unexpected keys (e.g. z); "
        "2 shape mismatches, checkpoint vs model (e.g. a.bias (4,) vs (2,), a.weight (3, 3) vs (2, 3))")
    assert "shape mismatches" not in checkpoint_mismatch(found, expected, any_shape={"a.weight", "a.bias"})


def test_a_checkpoint_of_another_class_count_is_refused_before_loading(tmp_path):
    folder = saved(timm.create_model("resnet18_castream", num_classes=5), tmp_path)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"num_classes": 5', '"num_classes": 3'))
    with pytest.raises(CheckpointError, match=r"does not hold the resnet18_castream its config.json describes "
                                              r"\(num_classes, model_args\): 2 shape mismatches, checkpoint vs model "
                                              r"\(e.g. backbone.fc.bias \(5,\) vs \(3,\)"):
        verify_checkpoint(folder)
