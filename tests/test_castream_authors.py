"""Where the thesis is silent, CA-Stream is built as the authors' code builds it: taps and initialisation."""

import json
import math

import pytest
import timm
import torch
from timm.models import save_for_hf
from torch import nn

import zoo  # noqa: F401  (registers the CA-Stream models with timm)

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
