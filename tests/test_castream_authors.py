"""Where the thesis is silent, CA-Stream is built as the authors' code builds it: taps and initialisation; and the
map the authors' code returns, the last attention's scores before the softmax, is the ``attention`` method's
``scores="logits"``."""

import json
import math

import pytest
import timm
import torch
from data_layouts import make_image_folder
from timm.models import save_for_hf
from torch import nn

import zoo  # noqa: F401  (registers the CA-Stream models with timm)
from zoo.evaluation import harness
from zoo.evaluation.saliency import explain, normalise_per_image

X = torch.randn(2, 3, 64, 64)


def convnext(backbone="convnext_atto", **kwargs):
    return timm.create_model("convnext_small_castream", backbone=backbone, num_classes=10, **kwargs)


def authors_convnext_taps(net, x):
    """The four tensors the authors' code taps, timm's ConvNeXt run module by module."""
    x = net.stem(x)
    taps = [x]
    x = net.stages[0](x)
    x = net.stages[1].downsample(x)
    taps.append(x)
    x = net.stages[1].blocks(x)
    x = net.stages[2].downsample(x)
    taps.append(x)
    x = net.stages[2].blocks(x)
    x = net.stages[3](x)
    taps.append(net.norm_pre(x))
    return taps


@pytest.mark.parametrize("backbone", ["convnext_atto", "convnextv2_atto"])
@pytest.mark.parametrize("stream_start", [0, 2])
def test_convnext_stream_taps_where_the_authors_do(backbone, stream_start):
    # layer scale 1, not timm's 1e-6: blocks that change their input, as trained ones do
    model = convnext(backbone=backbone, stream_start=stream_start, ls_init_value=1.0).eval()
    net = model.backbone
    query, attentions = model.stream.query.expand(len(X), -1), []
    for block, feats in zip(model.stream.blocks, authors_convnext_taps(net, X)[stream_start:], strict=True):
        query, attention = block(query, feats)
        attentions.append(attention.unflatten(1, feats.shape[-2:]))
    out = model.forward_stream(X)
    for got, expected in zip(out.attentions, attentions, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(X).logits, net.forward_head(query[:, :, None, None]), rtol=1e-6, atol=1e-7)


def test_convnext_taps_option_is_saved_with_the_checkpoint(tmp_path):
    assert convnext().taps == "authors"
    model = convnext(taps="stages").eval()
    save_for_hf(model, tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["taps"] == "stages"
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert reloaded.taps == "stages"
    for got, expected in zip(reloaded.forward_stream(X).attentions, model.forward_stream(X).attentions, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_resnet_has_only_the_authors_taps():
    assert timm.create_model("resnet18_castream").taps == "authors"
    with pytest.raises(ValueError, match="taps for a ResNet backbone must be one of 'authors', got 'stages'"):
        timm.create_model("resnet18_castream", taps="stages")


def linear_layers(model):
    return [module for module in model.stream.modules() if isinstance(module, nn.Linear)]


def test_resnet_stream_starts_xavier_uniform_with_pytorch_default_biases():
    model = timm.create_model("resnet18_castream", kv_proj=True)
    layers = linear_layers(model)
    assert len(layers) == 15  # key, value and projection of 5 blocks
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform
        assert 0.95 * bound < layer.weight.abs().max() <= bound
        bias_bound = 1 / math.sqrt(fan_in)  # nn.Linear's own bias initialisation
        assert 0.8 * bias_bound < layer.bias.abs().max() <= bias_bound
    torch.testing.assert_close(model.stream.query.mean(), torch.tensor(1.0), atol=0.5, rtol=0)  # q_0 ~ N(1, 1)


def test_convnext_stream_starts_as_timm_convnext_layers():
    model = convnext(kv_proj=True)
    layers = linear_layers(model)
    assert len(layers) == 12
    for layer in layers:
        weight = layer.weight.flatten()
        assert abs(weight.std().item() - 0.02) < 0.002
        assert abs(weight.mean().item()) < 0.003
        # normal: 95.4% of the weights within 2 std (a uniform distribution of that std: 100%)
        assert abs((weight.abs() < 0.04).float().mean().item() - 0.9545) < 0.025
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def authors_resnet_stream(model, x):
    """The authors' ResNet stream on this model's weights, their single-head cross attention written out: keys
    and values projected at every position, the scores scaled after the product. Returns the logits and the
    last block's map, its scores before the softmax [B, h, w]."""
    net = model.backbone
    x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
    cls = model.stream.query.expand(len(x), -1)
    stages = [nn.Identity(), net.layer1, net.layer2, net.layer3, net.layer4]
    for block, stage in zip(model.stream.blocks, stages, strict=True):
        x = stage(x)
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, d]
        keys, values = (tokens, tokens) if block.key is None else (block.key(tokens), block.value(tokens))
        dots = torch.einsum("bnd,bd->bn", keys, cls) * x.shape[1] ** -0.5
        cls = block.proj(torch.einsum("bn,bnd->bd", dots.softmax(1), values))
    return net.fc(cls), dots.unflatten(1, x.shape[-2:])


@pytest.mark.parametrize("kv_proj", [False, True])
def test_attention_logits_are_the_map_the_authors_code_returns(kv_proj):
    model = timm.create_model("resnet18_castream", num_classes=10, kv_proj=kv_proj).eval()
    images = torch.randn(2, 3, 96, 96)  # a 3x3 grid at the last stage
    with torch.no_grad():
        # a last query 20x longer: scores far apart, as a trained stream's are (at initialisation the softmax is
        # almost linear in them and both maps nearly the same)
        model.stream.blocks[-2].proj.weight.mul_(20)
        model.stream.blocks[-2].proj.bias.mul_(20)
        logits, scores = authors_resnet_stream(model, images)
        torch.testing.assert_close(model(images).logits, logits, rtol=1e-5, atol=1e-5)  # the same network
    authors = normalise_per_image(scores, (96, 96))
    torch.testing.assert_close(explain(model, images, "attention", scores="logits"), authors, rtol=0, atol=1e-5)
    # ours by default: the attention after the softmax, another map after min-max normalisation
    assert not torch.allclose(explain(model, images, "attention"), authors, atol=1e-2)


@pytest.mark.parametrize("name", ["resnet18_simpool", "resnet18_cifar"])
def test_attention_logits_need_a_castream(name):
    model = timm.create_model(name, num_classes=10).eval()
    images = torch.randn(1, 3, 32, 32)
    assert explain(model, images, "attention").shape == (1, 32, 32)  # their built-in map, after its softmax or not
    with pytest.raises(ValueError, match=f"scores='logits' needs a CA-Stream model .* built-in map of {name} "):
        explain(model, images, "attention", scores="logits")


def test_attention_scores_are_checked():
    model = timm.create_model("resnet18_castream", num_classes=10).eval()
    with pytest.raises(ValueError, match="attention scores must be one of 'softmax', 'logits', got 'probabilities'"):
        explain(model, X, "attention", scores="probabilities")


def test_the_harness_runs_and_records_the_authors_map(tmp_path, monkeypatch):
    options = []

    def recorded_explain(*args, **kwargs):
        options.append(kwargs)
        return explain(*args, **kwargs)

    monkeypatch.setattr(harness, "explain", recorded_explain)
    make_image_folder(tmp_path / "data")
    harness.main(["resnet18_castream", "--dataset", "imagenet-folder", "--data-root", str(tmp_path / "data"),
                  "--methods", "attention", "--option", "attention.scores=logits", "--metrics", "faithfulness",
                  "--limit", "2", "--out", str(tmp_path / "out"), "--img-size", "64", "--batch-size", "2", "--cpu"])
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"]["method_options"] == {"attention": {"scores": "logits"}}
    assert options and all(kwargs == {"scores": "logits"} for kwargs in options)
    assert {"AD", "AG", "AI"} <= set(results["methods"]["attention"])
