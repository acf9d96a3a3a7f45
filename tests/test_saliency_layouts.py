"""Saliency on layers whose maps are not [B, C, h, w]: channels-last stages (Swin, SwinV2, MambaOut; torchvision's
Swin) and Hiera's tokens in mask-unit order, against pytorch-grad-cam given the reshape transform and against
timm's own feature maps; a torch.compile'd model; a CA-Stream layer named as in its backbone."""

import functools

import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from test_saliency import assert_same_maps, photo_batch, pytorch_grad_cam
from torch import nn

from zoo.evaluation.saliency import Explainer, default_layer, explain
from zoo.evaluation.saliency.tokens import fits

SIZE = 128  # 4x4 maps after the last stage's stride of 32
TARGETS = torch.tensor([3, 7, 1])
SWIN = dict(img_size=SIZE, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1), window_size=2)
MODELS = {  # name: (timm options, default layer, pytorch-grad-cam's reshape transform of its output)
    "swin_tiny_patch4_window7_224": (SWIN, "layers.3", lambda maps: maps.permute(0, 3, 1, 2)),
    "swinv2_tiny_window8_256": (SWIN, "layers.3", lambda maps: maps.permute(0, 3, 1, 2)),
    "mambaout_femto": (dict(depths=(1, 1, 1, 1)), "stages.3", lambda maps: maps.permute(0, 3, 1, 2)),
    "swinv2_cr_tiny_ns_224": (SWIN, "stages.3", None),  # NCHW stages
    # after its last block a Hiera's tokens are in raster order again
    "hiera_tiny_224": (dict(img_size=SIZE, stages=(1, 1, 1, 1), embed_dim=32), "blocks.3",
                       lambda tokens: tokens.unflatten(1, (4, 4)).permute(0, 3, 1, 2)),
}


@functools.cache
def small(name):
    """A random-initialised timm model of ``MODELS`` with one block a stage and 10 classes."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name][0]).eval()
    nn.init.normal_(model.get_classifier().weight, std=0.02)  # Hiera's starts at zero: no gradient would flow
    return model


def reshaped(cls, reshape):
    """A pytorch-grad-cam method with ``reshape`` as its reshape transform."""
    return lambda model, target_layers: cls(model=model, target_layers=target_layers, reshape_transform=reshape)


@pytest.mark.parametrize("method, reference", [("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradcam_agrees_with_pytorch_grad_cam_given_the_reshape(name, method, reference):
    model = small(name)
    _, layer_name, reshape = MODELS[name]
    layer = model.get_submodule(layer_name)
    assert default_layer(model) is layer
    images = photo_batch(model, SIZE)
    assert_same_maps(explain(model, images, method, TARGETS),
                     pytorch_grad_cam(reshaped(reference, reshape), model, layer, images, TARGETS))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "hiera_tiny_224"])
def test_scorecam_agrees_with_pytorch_grad_cam_given_the_reshape(name, monkeypatch):
    model = small(name)
    _, layer_name, reshape = MODELS[name]
    images = photo_batch(model, SIZE, noise=0)
    # pytorch-grad-cam upsamples the masks with align_corners=True, we with False (evaluation/README)
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d",
                        lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False))
    assert_same_maps(explain(model, images, "scorecam", TARGETS[:1]),
                     pytorch_grad_cam(reshaped(ScoreCAM, reshape), model, model.get_submodule(layer_name), images,
                                      TARGETS[:1]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_stage_gives_timms_own_feature_maps_and_takes_them_back(name):
    model = small(name)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        stages = model.forward_intermediates(images, output_fmt="NCHW", intermediates_only=True)
    for info, maps in zip(model.feature_info, stages, strict=True):
        explainer = Explainer(model, images, TARGETS[:2], info["module"], name)
        with torch.no_grad():
            capture = explainer.capture()
            torch.testing.assert_close(capture.activations, maps, rtol=0, atol=0)
            # the maps put back in the layer's layout (as Ablation-CAM does) give the model's own logits
            torch.testing.assert_close(explainer.logits_with_layer_output(images, capture.activations),
                                       capture.logits, rtol=0, atol=0)


@pytest.mark.parametrize("method, options", [("cam", {}), ("xgradcam", {}), ("layercam", {}), ("hirescam", {}),
                                             ("ablationcam", dict(batch_size=256)), ("opticam", dict(iterations=2))])
def test_every_cam_method_runs_on_channels_last_maps_and_hiera_tokens(method, options):
    for name in ("swin_tiny_patch4_window7_224", "hiera_tiny_224"):
        maps = explain(small(name), torch.randn(1, 3, SIZE, SIZE), method, TARGETS[:1], **options)
        assert maps.shape == (1, SIZE, SIZE) and maps.isfinite().all() and 0 <= maps.min() < maps.max() <= 1


def test_a_layer_that_declares_nothing_is_probed():
    """torchvision's Swin declares no format: its stages' [B, h, w, C] are told from the input's size; an NCHW
    convolution inside a channels-last MambaOut block is read as NCHW."""
    torch.manual_seed(0)
    swin = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    images = photo_batch(swin, SIZE)
    assert default_layer(swin) is swin.features[-1]
    assert_same_maps(explain(swin, images, "gradcam", TARGETS),
                     pytorch_grad_cam(reshaped(GradCAM, MODELS["mambaout_femto"][2]), swin, swin.features[-1], images,
                                      TARGETS))
    mambaout = small("mambaout_femto")
    conv = mambaout.stages[3].blocks[0].conv
    assert_same_maps(explain(mambaout, images, "gradcam", TARGETS, layer=conv),
                     pytorch_grad_cam(GradCAM, mambaout, conv, images, TARGETS))


@pytest.mark.parametrize("grid, size, expected", [
    ((4, 4), (128, 128), True),
    ((4, 192), (128, 128), False),  # a channels-last map read as NCHW
    ((1, 1), (48, 96), True),  # global pooling: any size
    ((2, 3), (56, 72), True),  # stride 32, rounded up
    ((4, 1), (128, 128), False),  # no one stride for both sides
])
def test_fits_by_hand(grid, size, expected):
    assert fits(grid, size) is expected


def test_a_hiera_token_layer_other_than_a_block_is_refused():
    with pytest.raises(ValueError, match=r"layer LayerNorm of hiera_tiny_224 \('blocks.3.norm1'\) outputs tokens in "
                                         r"Hiera's mask-unit order.* the default blocks.3"):
        explain(small("hiera_tiny_224"), torch.randn(1, 3, SIZE, SIZE), "gradcam", layer="blocks.3.norm1")


def test_a_compiled_model_is_explained_through_the_module_it_wraps():
    model = small("mambaout_femto")
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(explain(torch.compile(model), images, "gradcam", TARGETS[:2]),
                               explain(model, images, "gradcam", TARGETS[:2]))


def test_a_ca_stream_layer_may_be_named_as_in_its_backbone():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_castream", return_saliency=False, num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    ours = explain(model, images, "gradcam", TARGETS[:2], layer="layer3.1")
    torch.testing.assert_close(ours, explain(model, images, "gradcam", TARGETS[:2], layer=model.backbone.layer3[1]))
    assert not torch.allclose(ours, explain(model, images, "gradcam", TARGETS[:2]))  # not the default layer4
    with pytest.raises(ValueError, match=r"CAStream has no layer 'layer9' \(its top-level modules: backbone, stream"):
        explain(model, images, "gradcam", layer="layer9")
