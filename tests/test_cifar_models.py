"""CIFAR ResNet-18 and MobileNet-V2 (thesis ch. 4): output contract, exact CAM, architecture against
torchvision, timm registry and Hub loading, input errors, and the saliency methods on them."""

import pytest
import timm
import torch
import torchvision
from captum.attr import GuidedBackprop
from test_hub import assert_same_outputs, saved
from torch import nn

import zoo
from zoo.evaluation.saliency import default_layer, explain, normalise_per_image
from zoo.hub import add_to_hf_cache

NAMES = ["resnet18_cifar", "mobilenetv2_cifar"]
# Parameter counts with 100 classes: torchvision's resnet18 (11,689,512 at 1000 classes) with a 3x3 stem
# conv (1,728 instead of 9,408 weights) and a 100-way fc (51,300 instead of 513,000); mobilenet_v2
# (3,504,872 at 1000 classes) with a 100-way classifier (128,100 instead of 1,281,000).
PARAMS = {"resnet18_cifar": 11_220_132, "mobilenetv2_cifar": 2_351_972}
NUM_FEATURES = {"resnet18_cifar": 512, "mobilenetv2_cifar": 1280}


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def build(name, **kwargs):
    return timm.create_model(name, **kwargs).eval()


def randomise_batchnorm(model):
    """Non-trivial BatchNorm statistics and affine parameters, so that eval mode is not an identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
    return model


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


# --- output contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("size, grid", [(32, 4), (40, 5), (8, 1)])
def test_forward_returns_logits_and_the_cam(name, size, grid):
    model = build(name)
    out = model(images(size=size))
    assert isinstance(out, zoo.ModelOutput)
    assert out.logits.shape == (2, 100)
    assert out.saliency.shape == (2, grid, grid)


def test_return_saliency_false_gives_plain_logits(name):
    model, x = build(name), images()
    expected = model(x).logits
    model.return_saliency = False
    torch.testing.assert_close(model(x), expected)
    plain = build(name, return_saliency=False)
    plain.load_state_dict(model.state_dict())
    out = plain(x)
    assert isinstance(out, torch.Tensor) and not isinstance(out, zoo.ModelOutput)
    torch.testing.assert_close(out, expected)


def test_saliency_is_the_exact_cam_of_the_predicted_class(name):
    model, x = randomise_batchnorm(build(name)), images(batch=3)
    with torch.no_grad():
        nn.init.normal_(model.fc.bias)  # a non-zero bias, so the identity below checks it
        logits, saliency = model(x)
        predicted = logits.argmax(-1)
        # independently: the classifier row of the predicted class dotted with each position's features
        features = model.forward_features(x)
        expected = torch.einsum("bchw,bc->bhw", features, model.fc.weight[predicted])
    torch.testing.assert_close(saliency, expected)
    # GAP then linear: the map's mean plus the bias is the logit, in logit units
    torch.testing.assert_close(saliency.mean((1, 2)) + model.fc.bias[predicted],
                               logits.gather(1, predicted[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.class_activation_map(features, predicted), saliency)


def test_timm_head_interface(name):
    model, x = build(name, drop_rate=0.2), images()
    features = model.forward_features(x)
    assert features.shape == (2, NUM_FEATURES[name], 4, 4)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features) == (2, NUM_FEATURES[name])
    torch.testing.assert_close(pooled, features.mean((2, 3)))
    torch.testing.assert_close(model.forward_head(features), model(x).logits)
    assert model.get_classifier() is model.fc
    model.reset_classifier(10)
    assert model(x).logits.shape == (2, 10) and model.num_classes == 10
    model.reset_classifier(0)  # no classifier: pooled features, no class to map
    torch.testing.assert_close(model(x), pooled)
    with pytest.raises(ValueError, match="needs global average pooling"):
        model.reset_classifier(10, global_pool="max")


def test_feature_info_and_features_only(name):
    model = build(name)
    assert [info["reduction"] for info in model.feature_info] == [1, 2, 4, 8]
    assert [info["module"] for info in model.feature_info] == [f"stages.{i}" for i in range(4)]
    assert model.feature_info[-1]["num_chs"] == model.num_features
    extractor = timm.create_model(name, features_only=True).eval()
    outs = extractor(images())
    assert [o.shape[1] for o in outs] == [info["num_chs"] for info in model.feature_info]
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]


def test_grad_checkpointing_gives_the_same_gradients(name):
    model, x = build(name), images()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        logits, saliency = model(x)
        (logits.square().sum() + saliency.sum()).backward()
        grads.append(model.stem.conv.weight.grad.clone())
    assert model.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


# --- architecture against torchvision ------------------------------------------------------------


def torchvision_reference(name):
    """torchvision's ImageNet network made into the CIFAR form by hand (3x3 stride-1 stem, no max-pool;
    MobileNet-V2: stride 1 for the stem and the first 24-channel block)."""
    if name == "resnet18_cifar":
        net = torchvision.models.resnet18(num_classes=100)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        return net
    net = torchvision.models.mobilenet_v2(num_classes=100)
    assert net.features[0][0].kernel_size == (3, 3)  # the ImageNet stem is 3x3 already: only its stride changes
    net.features[0][0].stride = (1, 1)
    net.features[2].conv[1][0].stride = (1, 1)  # depthwise conv of the first 24-channel block
    return net


def test_parameter_count_matches_torchvision(name):
    model, reference = build(name), torchvision_reference(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == PARAMS[name]
    # same layers, not only the same total: the parameter shapes agree one by one, in order
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]


def test_same_function_as_torchvision_with_the_same_weights(name):
    # Both list their tensors in the same order (stem, blocks, head), so the weights carry over by position;
    # equal logits then check the strides, ReLU/ReLU6 placement, linear bottlenecks and residuals too.
    model, reference = randomise_batchnorm(build(name)), torchvision_reference(name).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    reference.load_state_dict(dict(zip(theirs, ours.values(), strict=True)))
    x = images(size=40)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x), rtol=1e-4, atol=1e-5)


# --- timm registry and the Hub ----------------------------------------------------------------------


def test_registered_with_timm():
    assert set(NAMES) <= set(zoo.list_models())
    tags = {"resnet18_cifar.c100", "resnet18_cifar.c100_gd", "mobilenetv2_cifar.c100", "mobilenetv2_cifar.c100_gd"}
    assert tags <= set(zoo.list_models(pretrained=True))
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.hf_hub_id == zoo.hub.hub_id(tag)
        assert (cfg.input_size, cfg.num_classes, cfg.crop_pct) == ((3, 32, 32), 100, 1.0)
        assert cfg.mean == (0.5071, 0.4865, 0.4409) and cfg.std == (0.2673, 0.2564, 0.2762)
        assert ("gradient-denoised" in cfg.notes[0]) == tag.endswith("_gd")
    model = timm.create_model("resnet18_cifar", num_classes=10, in_chans=1)
    assert model.pretrained_cfg["tag"] == "c100"
    assert model(torch.randn(1, 1, 32, 32)).logits.shape == (1, 10)


@pytest.mark.parametrize("tag", ["resnet18_cifar.c100", "mobilenetv2_cifar.c100"])
def test_missing_weights_say_where_they_were_looked_for(tag):
    with pytest.raises(RuntimeError, match=rf"(?s)no weights found for {tag.split('.')[0]} at "
                                           rf"hf-hub:interpretable-zoo/{tag} .*README's 'Weights'"):
        timm.create_model(tag, pretrained=True)


def test_hub_round_trip_offline(tmp_path):
    x = images()
    # a tag's own Hub id (this test's cache only; the missing-weights test uses the other tags)
    model = randomise_batchnorm(build("mobilenetv2_cifar"))
    add_to_hf_cache(saved(model, tmp_path / "gd"), zoo.hub.hub_id("mobilenetv2_cifar.c100_gd"))
    assert_same_outputs(model, timm.create_model("mobilenetv2_cifar.c100_gd", pretrained=True), x)
    # another repository through the overlay, and by its hf-hub: name (construction arguments in config.json)
    model = randomise_batchnorm(build("resnet18_cifar", num_classes=10))
    add_to_hf_cache(saved(model, tmp_path / "r18", num_classes=10), "someone/resnet18-cifar10")
    overlay = dict(hf_hub_id="someone/resnet18-cifar10", num_classes=10)
    assert_same_outputs(model, timm.create_model("resnet18_cifar", num_classes=10, pretrained=True,
                                                 pretrained_cfg_overlay=overlay), x)
    reloaded = timm.create_model("hf-hub:someone/resnet18-cifar10", pretrained=True)
    assert reloaded.num_classes == 10
    assert_same_outputs(model, reloaded, x)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 32, 32), r"expects an image batch \[B, C, H, W\], got a 3-D tensor .*unsqueeze\(0\)"),
    (torch.randn(2, 1, 32, 32), "expects 3 input channels, got 1"),
    (torch.randn(2, 3, 32, 7), "input 32x7 is too small for .*_cifar: its last stage has stride 8"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "_cifar expects a floating-point image batch, got torch.uint8"),
])
def test_bad_input_is_named(name, x, message):
    model = build(name)
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        model.forward_features(x)


# --- saliency methods -------------------------------------------------------------------------------


def test_explain_on_the_default_layer(name):
    model, x = randomise_batchnorm(build(name)), images(batch=3)
    assert default_layer(model) is model.stages[-1]
    maps = {method: explain(model, x, method) for method in ("gradcam", "guided_backprop", "attention", "cam")}
    for found in maps.values():
        assert found.shape == (3, 32, 32)
        assert not found.isnan().any() and found.min() >= 0
        assert found.flatten(1).amax(1).eq(1).all()  # in [0, 1] and not a constant (all-zero) map
    # the built-in map is CAM, and Grad-CAM at the last stage of a GAP + linear head is ReLU(CAM) / (h w)
    saliency = model(x).saliency.detach()
    torch.testing.assert_close(maps["attention"], normalise_per_image(saliency, (32, 32)))
    torch.testing.assert_close(maps["cam"], normalise_per_image(saliency, (32, 32)))
    torch.testing.assert_close(maps["gradcam"], normalise_per_image(saliency.relu(), (32, 32)), rtol=0, atol=1e-4)


def test_guided_backprop_agrees_with_captum_on_resnet18_cifar():
    # captum hooks the nn.ReLU modules; the zoo's guided mode intercepts the ReLU calls
    model, x, targets = randomise_batchnorm(build("resnet18_cifar")), images(batch=2), torch.tensor([3, 17])
    model.return_saliency = False
    reference = GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=targets)
    model.return_saliency = True
    expected = normalise_per_image(reference.abs().amax(1), (32, 32))
    torch.testing.assert_close(explain(model, x, "guided_backprop", targets), expected)
