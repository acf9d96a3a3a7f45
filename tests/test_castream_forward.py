"""CA-Stream forward: the output contract, the equations, the timm interface and input errors."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import accuracy

import zoo
from zoo.models.castream import CrossAttentionBlock

SIZE = 64


def build(family, **kwargs):
    """Small random-initialised models of each backbone family."""
    if family == "resnet":
        return timm.create_model("resnet18_castream", **kwargs).eval()
    return timm.create_model("convnext_small_castream", backbone="convnext_atto", **kwargs).eval()


@pytest.fixture(params=["resnet", "convnext"])
def family(request):
    return request.param


def images(batch=2, size=SIZE):
    return torch.randn(batch, 3, size, size)


def test_forward_returns_logits_and_last_attention(family):
    model, x = build(family, num_classes=10), images()
    out = model(x)
    assert isinstance(out, zoo.ModelOutput)
    logits, saliency = out
    assert logits.shape == (2, 10)
    assert saliency.shape == (2, SIZE // 32, SIZE // 32)
    assert (saliency >= 0).all()
    torch.testing.assert_close(saliency.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(saliency, model.forward_stream(x).attentions[-1])


@pytest.mark.parametrize("family, grids", [
    ("resnet", [16, 16, 8, 4, 2]),  # S0 after the stem's max-pool, then the four stages
    ("convnext", [16, 8, 4, 2]),
])
def test_every_stage_attention_is_reachable(family, grids):
    attentions = build(family).forward_stream(images(size=SIZE)).attentions
    assert [a.shape[-1] for a in attentions] == grids
    for attention in attentions:
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum((1, 2)), torch.ones(2))


def test_cross_attention_block_is_single_query_attention():
    # eq. 3.1, 3.3, 3.7 against torch's scaled_dot_product_attention as the reference
    block, query, features = CrossAttentionBlock(32, 48), torch.randn(3, 32), torch.randn(3, 32, 5, 7)
    next_query, attention = block(query, features)
    tokens = features.flatten(2).transpose(1, 2)  # [B, p, d]
    pooled = F.scaled_dot_product_attention(query[:, None, None], tokens[:, None], tokens[:, None])[:, 0, 0]
    torch.testing.assert_close(next_query, block.proj(pooled))
    torch.testing.assert_close(attention, torch.softmax(tokens @ query.unsqueeze(2) / 32 ** 0.5, 1).squeeze(2))


def test_proj_ca_block_is_eq_3_8_on_projected_tokens():
    block, query, features = CrossAttentionBlock(16, 8, kv_proj=True), torch.randn(2, 16), torch.randn(2, 16, 4, 4)
    for layer in (block.key, block.value):  # non-zero biases, so the identities in the block are exercised
        torch.nn.init.normal_(layer.bias)
    tokens = features.flatten(2).transpose(1, 2)
    keys, values = block.key(tokens), block.value(tokens)
    attention = torch.softmax(keys @ query.unsqueeze(2) / 16 ** 0.5, dim=1)
    expected = block.proj((values * attention).sum(1))
    next_query, got_attention = block(query, features)
    torch.testing.assert_close(got_attention, attention.squeeze(2))
    torch.testing.assert_close(next_query, expected)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet26d", "seresnext26d_32x4d", "convnext_atto",
                                      "convnextv2_atto"])
def test_stream_runs_on_timm_stage_outputs_and_reuses_the_classifier(backbone):
    # Recompute eq. 3.5-3.7 from timm's own forward_intermediates and the backbone's head,
    # for timm variants (deep stems, SE blocks, ConvNeXt-V2) as well as the registered ones.
    # ConvNeXt streams tap the stage outputs with taps="stages" (the authors' taps: test_castream_authors.py);
    # layer scale 1, not timm's 1e-6, so that a stage's output differs from its input.
    resnet = backbone.startswith(("resnet", "seresnext"))
    options = {} if resnet else dict(taps="stages", ls_init_value=1.0)
    model, x = zoo.CAStream(backbone=backbone, num_classes=10, **options).eval(), images()
    net = model.backbone
    if resnet:
        stem, *stages = net.forward_intermediates(x, intermediates_only=True)
        features = [net.maxpool(stem), *stages]  # the authors tap the stem after its max-pool
    else:
        features = net.forward_intermediates(x, intermediates_only=True, norm=True)
    query, attentions = model.stream.query.expand(2, -1), []
    for block, feats in zip(model.stream.blocks, features, strict=True):
        tokens = feats.flatten(2).transpose(1, 2)
        attention = torch.softmax(tokens @ query.unsqueeze(2) / tokens.shape[-1] ** 0.5, dim=1)
        query = block.proj((tokens * attention).sum(1))
        attentions.append(attention.squeeze(2).unflatten(1, feats.shape[-2:]))
    expected = net.forward_head(query[:, :, None, None])
    torch.testing.assert_close(model(x).logits, expected)
    out = model.forward_stream(x)
    torch.testing.assert_close(out.features, features[-1])
    for got, reference in zip(out.attentions, attentions, strict=True):
        torch.testing.assert_close(got, reference)


def test_return_saliency_false_gives_plain_logits_for_timm_tooling(family):
    model, x = build(family, num_classes=5, return_saliency=False), images(4)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 5)
    top1, top5 = accuracy(logits, logits.argmax(-1), topk=(1, 5))
    assert top1.item() == top5.item() == 100.0


def test_forward_features_and_forward_head(family):
    model, x = build(family, num_classes=7), images()
    tokens = model.forward_features(x)
    grid = (SIZE // 32) ** 2
    assert tokens.shape == (2, 1 + grid, model.num_features)
    torch.testing.assert_close(model.forward_head(tokens), model(x).logits)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="forward_head expects the tokens"):
        model.forward_head(model.backbone.forward_features(x))


def test_classifier_access_and_reset(family):
    model, x = build(family, num_classes=7), images()
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).logits.shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).logits.shape == (2, model.num_features)
    with pytest.raises(ValueError, match="replaces global pooling"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name, backbone_weights", [
    ("resnet50_castream", "resnet50.tv_in1k"),
    ("convnext_small_castream", "convnext_small.fb_in1k"),
])
def test_data_config_is_the_backbone_weights(name, backbone_weights):
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = resolve_data_config(model=model)
    source = timm.models.get_pretrained_cfg(backbone_weights)
    assert ours["input_size"] == (3, 224, 224)
    assert (ours["interpolation"], ours["crop_pct"], ours["mean"], ours["std"]) == (
        source.interpolation, source.crop_pct, source.mean, source.std)


def test_class_specific_query_is_the_target_or_the_gap_prediction():
    model, x = build("resnet", num_classes=6, class_specific=True), images(3)
    gap_prediction = model.backbone(x).argmax(-1)
    torch.testing.assert_close(model(x).logits, model(x, gap_prediction).logits)
    # the first block shows which query started the stream (random features flatten later attention)
    first_attention = model.forward_stream(x).attentions[0]
    torch.testing.assert_close(first_attention, model.forward_stream(x, gap_prediction).attentions[0])
    other = (gap_prediction + 1) % 6
    assert not torch.allclose(first_attention, model.forward_stream(x, other).attentions[0])
    model.train()
    with pytest.raises(ValueError, match="trains with the target's query"):
        model(x)
    assert model(x, other).logits.shape == (3, 6)
    model.reset_classifier(4)
    assert model.stream.query.shape == (4, 64)


def test_contribution_map_is_each_positions_share_of_the_resnet_logit():
    model, x = build("resnet", num_classes=10).double(), images().double()
    logits = model(x).logits
    target = torch.tensor([3, 8])
    contributions = model.contribution_map(x, target)
    fc = model.get_classifier()
    torch.testing.assert_close(contributions.sum((1, 2)) + fc.bias[target], logits[[0, 1], target])
    # independently: a_i * w_c . (W_L phi_i + b_L)
    out = model.forward_stream(x)
    last = model.stream.blocks[-1]
    per_position = last.proj(out.features.flatten(2).transpose(1, 2)) @ fc.weight.T  # [B, p, C]
    expected = out.attentions[-1].flatten(1) * per_position[[0, 1], :, target]
    torch.testing.assert_close(contributions.flatten(1), expected)
    predicted = model.contribution_map(x)
    torch.testing.assert_close(predicted.sum((1, 2)) + fc.bias[logits.argmax(-1)], logits.max(-1).values)


def test_contribution_map_sums_to_the_convnext_logit():
    model, x = build("convnext", num_classes=10).double(), images().double()
    logits = model(x).logits
    contributions = model.contribution_map(x)
    bias = model.get_classifier().bias[logits.argmax(-1)]
    torch.testing.assert_close(contributions.sum((1, 2)) + bias, logits.max(-1).values)


def test_contribution_map_needs_eval_mode():
    with pytest.raises(RuntimeError, match="call model.eval"):
        build("resnet").train().contribution_map(images())


@pytest.mark.parametrize("bad, message", [
    (torch.randn(3, SIZE, SIZE), r"got a 3-D tensor of shape \(3, 64, 64\) \(a single image\?"),
    (torch.randn(2, 1, SIZE, SIZE), "expects 3 input channels, got 1"),
    (torch.randn(2, 3, 24, SIZE), "input 24x64 is too small for .*: its last stage has stride 32"),
    (torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), "expects a floating-point image batch, got torch.uint8"),
])
def test_bad_input_is_named(family, bad, message):
    with pytest.raises(ValueError, match=message):
        build(family)(bad)


def test_non_tensor_input_is_named():
    with pytest.raises(TypeError, match="expects a torch.Tensor image batch, got list"):
        build("resnet")([[0.0]])


def test_saliency_stays_finite_under_autocast_and_extreme_inputs(family):
    model = build(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saliency = model(images()).saliency
    assert torch.isfinite(saliency).all()
    torch.testing.assert_close(saliency.float().sum((1, 2)), torch.ones(2), atol=1e-2, rtol=0)
    saliency = model(images() * 1e4).saliency
    assert torch.isfinite(saliency).all() and (saliency >= 0).all()
