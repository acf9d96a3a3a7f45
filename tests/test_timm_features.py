"""timm's feature API and the attributes timm's tools read, on the pooling families (issue 23): forward_intermediates,
prune_intermediate_layers, features_only, group_matcher with layer decay, ModelEmaV3, drop_rate, global_pool; and the
RegNet streams, built on timm's feature points."""

import copy

import pytest
import timm
import timm.optim
import torch
from timm.models import group_parameters
from timm.utils import ModelEmaV3

import zoo

SIZE = 64  # a 2x2 last stage on every backbone here

# small backbones of each family; layer scale 1 (not timm's 1e-6) so that a ConvNeXt stage changes its input, and a
# head norm first so that its pre-head norm is not the identity (norm=True matters)
CONVNEXT = dict(backbone="convnext_atto", ls_init_value=1.0, head_norm_first=True)
MODELS = {
    "resnet": lambda **kw: zoo.CAStream(backbone="resnet18", num_classes=5, **kw),
    "convnext authors": lambda **kw: zoo.CAStream(num_classes=5, **CONVNEXT, **kw),
    "convnext stages": lambda **kw: zoo.CAStream(num_classes=5, taps="stages", **CONVNEXT, **kw),
    "regnet": lambda **kw: zoo.CAStream(backbone="regnety_002", num_classes=5, **kw),
    "simpool": lambda **kw: zoo.SimPool(backbone="resnet18", num_classes=5, **kw),
    "simpool convnext": lambda **kw: zoo.SimPool(num_classes=5, **CONVNEXT, **kw),
}
STREAMS = [name for name in MODELS if "simpool" not in name]


def images(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE)


@pytest.fixture(params=MODELS)
def model(request):
    return MODELS[request.param]().eval()


@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_are_the_backbones_feature_points_and_the_tokens_of_forward_features(model, norm):
    x, net = images(), model.backbone
    with torch.no_grad():
        expected = net.forward_intermediates(x, norm=norm, intermediates_only=True)
        assert len(expected) == len(model.feature_info)
        for indices, taken in ((None, range(len(expected))), (2, [-2, -1]), ([0, -1], [0, -1])):
            reference = [expected[index] for index in taken]
            only = model.forward_intermediates(x, indices, norm=norm, intermediates_only=True)
            tokens, intermediates = model.forward_intermediates(x, indices, norm=norm)  # with the pooling's pass
            for got in (only, intermediates):
                assert len(got) == len(reference)
                for feature, ref, info in zip(got, reference, [model.feature_info[i] for i in taken], strict=True):
                    torch.testing.assert_close(feature, ref, rtol=0, atol=0)
                    assert feature.shape[1] == info["num_chs"] and SIZE // feature.shape[-1] == info["reduction"]
            torch.testing.assert_close(tokens, model.forward_features(x), rtol=0, atol=0)
            torch.testing.assert_close(model.forward_head(tokens), model(x).logits, rtol=0, atol=0)
    if norm:  # the ConvNeXts' last feature point, through their pre-head norm
        assert not isinstance(net, timm.models.ConvNeXt) or not torch.allclose(
            expected[-1], net.forward_intermediates(x, intermediates_only=True)[-1])


@pytest.mark.parametrize("name", STREAMS)
def test_the_streams_taps_against_timms_feature_points(name):
    """The stream reads timm's feature points, except where the authors tap elsewhere: a ResNet's stem after its
    max-pool, a ConvNeXt's stages 1 and 2 after their downsampling layers and its last stage after its pre-head
    norm; and the attentions forward_intermediates returns are forward_stream's."""
    model, x = MODELS[name]().eval(), images()
    net = model.backbone
    with torch.no_grad():
        features = net.forward_intermediates(x, intermediates_only=True)
        taps = list(model._stage_features(x))
        if name == "resnet":
            expected = [net.maxpool(features[0]), *features[1:]]
        elif name == "convnext authors":
            stem = net.stem(x)
            expected = [stem, net.stages[1].downsample(features[0]), net.stages[2].downsample(features[1]),
                        net.norm_pre(features[3])]
            torch.testing.assert_close(net.stages[0](stem), features[0], rtol=0, atol=0)
        else:  # timm's feature points, the last as it reaches the head
            expected = [*features[:-1], net.forward_features(x)]
        assert len(taps) == len(expected) == len(model.stream.blocks)
        for tap, reference in zip(taps, expected, strict=True):
            torch.testing.assert_close(tap, reference, rtol=0, atol=0)

        out = model.forward_stream(x)
        pairs = model.forward_intermediates(x, intermediates_only=True, return_attentions=True)
        tokens, pairs_too = model.forward_intermediates(x, [1, 3], return_attentions=True)
        torch.testing.assert_close(tokens, model.forward_features(x), rtol=0, atol=0)
        for (feature, attention), reference, stream_attention in zip(pairs, features, out.attentions, strict=True):
            torch.testing.assert_close(feature, reference, rtol=0, atol=0)
            torch.testing.assert_close(attention, stream_attention, rtol=0, atol=0)
        for (feature, attention), index in zip(pairs_too, [1, 3], strict=True):
            torch.testing.assert_close(feature, features[index], rtol=0, atol=0)
            torch.testing.assert_close(attention, out.attentions[index], rtol=0, atol=0)


def test_attentions_are_those_of_tapped_stages():
    model = zoo.CAStream(backbone="resnet18", num_classes=5, stream_start=2).eval()
    with torch.no_grad():
        out = model.forward_stream(images())
        pairs = model.forward_intermediates(images(), [2, 4], intermediates_only=True, return_attentions=True)
        assert [attention.shape for _, attention in pairs] == [out.attentions[0].shape, out.attentions[2].shape]
        with pytest.raises(ValueError, match="the stream starts at stage 2: no attention at stage 1"):
            model.forward_intermediates(images(), [1, 4], return_attentions=True)
        with pytest.raises(ValueError, match="NCHW only, got output_fmt='NHWC'"):
            model.forward_intermediates(images(), output_fmt="NHWC")
        with pytest.raises(ValueError, match="too small"):
            model.forward_intermediates(torch.randn(1, 3, 16, 16), intermediates_only=True)


def test_stop_early_stops_the_backbone():
    model, x = MODELS["resnet"]().eval(), images()
    calls = []
    model.backbone.layer4.register_forward_hook(lambda *args: calls.append("layer4"))
    with torch.no_grad():
        early = model.forward_intermediates(x, [1], stop_early=True, intermediates_only=True)
        assert calls == []
        torch.testing.assert_close(early[0], model.forward_intermediates(x, [1], intermediates_only=True)[0])


@pytest.mark.parametrize("name", ["resnet", "convnext authors", "regnet", "simpool"])
def test_pruning_keeps_the_features_asked_for(name):
    model, x = MODELS[name]().eval(), images()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([0, 2]) == [0, 2]
        got = pruned.forward_intermediates(x, [0, 2], intermediates_only=True)
        for feature, index in zip(got, [0, 2], strict=True):
            torch.testing.assert_close(feature, expected[index], rtol=0, atol=0)
    assert [n for n, _ in pruned.named_children()] == ["backbone"]  # the pooling went with the head
    assert pruned.num_features == model.feature_info[2]["num_chs"] and pruned.num_classes == 0
    assert parameter_count(pruned) < parameter_count(model.backbone)  # the last stages went


@pytest.mark.parametrize("name", ["resnet", "convnext authors"])
def test_pruning_without_the_head_keeps_a_working_model(name):
    model, x = MODELS[name]().eval(), images()
    kept = copy.deepcopy(model)
    assert kept.prune_intermediate_layers(None, prune_head=False) == list(range(len(model.feature_info)))
    with torch.no_grad():
        torch.testing.assert_close(kept(x).logits, model(x).logits, rtol=0, atol=0)
    without_norm = copy.deepcopy(model)
    without_norm.prune_intermediate_layers(None, prune_norm=True, prune_head=False)  # a ConvNeXt's norm_pre goes
    registered = {id(module) for module in without_norm.modules()}
    assert all(id(module) in registered for run in without_norm._runs for module in run.modules)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant, backbone", [("resnet18_castream", "resnet18"),
                                               ("convnext_tiny_castream", "convnext_atto"),
                                               ("regnety_016_castream", "regnety_002"),
                                               ("resnet18_simpool", "resnet18")])
@pytest.mark.parametrize("out_indices", [None, (1, 3)])
def test_features_only_gives_the_backbones_features(variant, backbone, out_indices, tmp_path):
    weights = tmp_path / "backbone.pth"
    torch.save(timm.create_model(backbone).state_dict(), weights)
    options = dict(features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    options.update({} if out_indices is None else dict(out_indices=out_indices))
    reference = timm.create_model(backbone, **options).eval()  # the same weights: a backbone-only checkpoint
    extractor = timm.create_model(variant, backbone=backbone, **options).eval()
    assert type(extractor).__name__ == "FeatureGetterNet"
    assert [name for name, _ in extractor.model.named_children()] == ["backbone"]  # the pooling went with the head
    assert extractor.feature_info.channels() == reference.feature_info.channels()
    assert extractor.feature_info.reduction() == reference.feature_info.reduction()
    x = images()
    with torch.no_grad():
        got, expected = extractor(x), reference(x)
    assert len(got) == len(expected) == len(out_indices or extractor.model.feature_info)
    for feature, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(feature, ref, rtol=0, atol=0)


def layer_ids(model, matcher):
    return group_parameters(model, matcher, reverse=True)


@pytest.mark.parametrize("name", ["resnet", "convnext authors", "regnet", "simpool convnext"])
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_is_the_backbones_with_the_pooling_in_the_last_stage(name, coarse):
    model = MODELS[name]()
    net = model.backbone
    own = layer_ids(net, net.group_matcher(coarse))
    ours = layer_ids(model, model.group_matcher(coarse))
    assert {f"backbone.{key}": value for key, value in own.items()} == {
        key: value for key, value in ours.items() if key.startswith("backbone.")}
    pooling = {value for key, value in ours.items() if not key.startswith("backbone.")}
    classifier = ours[f"backbone.{net.pretrained_cfg['classifier']}.weight"]
    assert pooling == {classifier - 1}  # the last stage's group, just below the head's


def test_layer_decay_scales_the_stream_as_the_last_stage():
    model = timm.create_model("resnet18_castream", num_classes=5)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.75)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["backbone.fc.weight"])] == 1.0
    assert scale[id(params["stream.query"])] == scale[id(params["backbone.layer4.1.conv2.weight"])] == 0.75
    assert scale[id(params["backbone.layer4.0.conv1.weight"])] == 0.75 ** 2
    assert scale[id(params["backbone.conv1.weight"])] == 0.75 ** 9  # stem, 8 blocks, head
    assert all(scale[id(p)] == 0.75 for p in model.stream.parameters())


def test_model_ema_v3_averages_its_own_copy():
    model, x = MODELS["convnext authors"]().eval(), images()
    with torch.no_grad():
        before = model(x).logits
        ema = ModelEmaV3(model, decay=0.5)
        for p in model.backbone.parameters():
            p.add_(1.0)
        assert not torch.allclose(model(x).logits, before)
        torch.testing.assert_close(ema.module(x).logits, before, rtol=0, atol=0)  # the copy taps its own backbone
        ema.update(model)
        averaged = copy.deepcopy(model)
        for p, q in zip(averaged.parameters(), ema.module.parameters(), strict=True):
            p.copy_(q)
        torch.testing.assert_close(ema.module(x).logits, averaged(x).logits)


@pytest.mark.parametrize("name, backbone", [("resnet18_castream", "resnet18"), ("regnety_016_castream", "regnety_002"),
                                            ("resnet18_simpool", "resnet18")])
def test_drop_rate_and_global_pool_as_timm_passes_them(name, backbone):
    model = timm.create_model(name, drop_rate=0.1, global_pool=None, backbone=backbone)  # timm drops a None
    assert model.drop_rate == model.backbone.drop_rate == 0.1
    assert timm.create_model(name, backbone=backbone).drop_rate == 0.0
    for pool in ("", "avg", "max"):
        with pytest.raises(ValueError, match=f"replaces the backbone's global pooling with its own: "
                                             f"global_pool='{pool}' cannot be set"):
            timm.create_model(name, global_pool=pool, backbone=backbone)
    with pytest.raises(ValueError, match="global_pool cannot be set"):
        model.reset_classifier(3, global_pool="")


def test_timm_tools_read_the_data_config_of_the_backbone_weights():
    model = timm.create_model("regnety_016_castream")
    config = timm.data.resolve_model_data_config(model)
    source = timm.models.get_pretrained_cfg("regnety_016.tv2_in1k")
    assert (config["input_size"], config["interpolation"], config["crop_pct"]) == (
        source.input_size, source.interpolation, source.crop_pct)
    assert model.pretrained_cfg["first_conv"] == "backbone.stem.conv"
    assert model.pretrained_cfg["classifier"] == "backbone.head.fc"


# RegNetY widths from timm's definitions (stem 32, then w0, wa, wm, depth quantised): (stem, s1, s2, s3, s4)
REGNET_WIDTHS = {"regnety_016": (32, 48, 120, 336, 888), "regnety_032": (32, 72, 216, 576, 1512)}


@pytest.mark.parametrize("backbone", REGNET_WIDTHS)
def test_regnet_stream_parameter_count_is_eq_3_3_on_its_widths(backbone):
    widths = REGNET_WIDTHS[backbone]
    # eq. 3.3 / 3.7: the query d_0, and per tapped stage a d_l x d_{l+1} projection plus bias, d_{L+1} = d_L
    stream = widths[0] + sum(d * d_next + d_next for d, d_next in zip(widths, widths[1:] + widths[-1:], strict=True))
    with torch.device("meta"):
        model = timm.create_model(f"{backbone}_castream")
        plain = timm.create_model(backbone)
    assert parameter_count(model) == parameter_count(plain) + stream
    assert [info["num_chs"] for info in model.feature_info] == list(widths)
    assert model.taps == "stages" and model._runs is None


def test_regnet_stream_classifies_with_the_backbones_head_and_explains_itself():
    model, x = MODELS["regnet"]().eval(), images()
    with torch.no_grad():
        out = model(x)
        stream = model.forward_stream(x)
        torch.testing.assert_close(out.logits, model.backbone.forward_head(stream.query[:, :, None, None]))
        contributions = model.contribution_map(x)
        target = out.logits.argmax(-1)
        torch.testing.assert_close(contributions.sum((1, 2)) + model.get_classifier().bias[target],
                                   out.logits.gather(1, target[:, None]).squeeze(1))
    assert [a.shape[-1] for a in stream.attentions] == [SIZE // 2, SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32]
    with pytest.raises(ValueError, match="taps for a RegNet backbone must be one of 'stages', got 'authors'"):
        zoo.CAStream(backbone="regnety_002", taps="authors")


def test_simpool_on_a_regnet_pools_its_last_stage_for_its_classifier():
    model, x = timm.create_model("regnety_016_simpool", backbone="regnety_002", num_classes=5).eval(), images()
    net = model.backbone
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits, net.head.fc(model.pool(net.forward_features(x))))
    assert out.saliency.shape == (2, SIZE // 32, SIZE // 32)
    torch.testing.assert_close(out.saliency.sum((1, 2)), torch.ones(2))


def test_grad_checkpointing_on_timms_feature_points_gives_the_same_gradients():
    model, x = MODELS["regnet"]().train(), images()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(stage.grad_checkpointing for stage in (model.backbone.s1, model.backbone.s4))
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)
