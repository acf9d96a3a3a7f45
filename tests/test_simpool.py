"""SimPool (Psomas et al. 2023) as zoo models: timm's SimPool2d in place of GAP on a frozen ResNet, ConvNeXt or
RegNet, its attention as built-in saliency, the stream recipe, the saliency methods and the hub's save/load path."""

import copy

import pytest
import timm
import torch
from timm.layers import SimPool2d
from timm.models import save_for_hf

import zoo
from zoo.evaluation.saliency import explain
from zoo.evaluation.saliency.core import default_layer
from zoo.hub import load_model, verify_checkpoint
from zoo.models.cost import parameter_count
from zoo.training.config import load_recipe
from zoo.training.objectives import Classification
from zoo.training.optimiser import create_optimizer
from zoo.training.train import build_model

NAMES = ["convnext_base_simpool", "convnext_small_simpool", "convnext_tiny_simpool", "regnety_016_simpool",
         "regnety_032_simpool", "resnet101_simpool", "resnet18_simpool", "resnet34_simpool", "resnet50_simpool"]
SMALL = {"resnet": ("resnet18_simpool", {}), "convnext": ("convnext_tiny_simpool", dict(backbone="convnext_atto"))}
SIZE = 64


def build(family, **kwargs):
    """A small random-initialised model of each backbone family."""
    name, small = SMALL[family]
    return timm.create_model(name, pretrained=False, **small, **kwargs)


@pytest.fixture(params=sorted(SMALL))
def family(request):
    return request.param


def images(batch=2, size=SIZE):
    return torch.randn(batch, 3, size, size)


def values(pool, features):
    """SimPool2d's values: the LayerNorm'd positions, split into heads [B, heads, N, head_dim]."""
    batch = features.shape[0]
    tokens = pool.norm(features.flatten(2).transpose(1, 2))
    return tokens.reshape(batch, -1, pool.num_heads, pool.head_dim).transpose(1, 2)


def test_the_variants_are_registered_with_declared_unpublished_tags():
    assert set(zoo.list_models("*simpool*")) == set(timm.list_models("*_simpool")) == set(NAMES)
    assert {f"{name}.in1k" for name in NAMES} <= set(zoo.list_models(pretrained=True))
    cfg = timm.models.get_pretrained_cfg("resnet50_simpool.in1k")
    assert cfg.hf_hub_id == "interpretable-zoo/resnet50_simpool.in1k" and cfg.classifier == "backbone.fc"
    assert cfg.notes == ("SimPool trained on top of frozen resnet50.tv_in1k",)
    with pytest.raises(RuntimeError, match=r"(?s)no weights found for resnet18_simpool at hf-hub:"
                                           r"interpretable-zoo/resnet18_simpool.in1k"):
        timm.create_model("resnet18_simpool", pretrained=True)


@pytest.mark.parametrize("name, channels", [("resnet18_simpool", 512), ("convnext_tiny_simpool", 768)])
def test_the_simpool_head_has_the_parameters_counted_by_hand(name, channels):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
        biased = timm.create_model(name, pretrained=False, qkv_bias=True)
    assert isinstance(model.pool, SimPool2d) and model.pool.num_heads == 1 and model.pool.gamma is None
    layer_norm, query, key = 2 * channels, channels * channels, channels * channels
    assert parameter_count(model.pool) == layer_norm + query + key
    assert parameter_count(biased.pool) == layer_norm + query + channels + key + channels
    assert parameter_count(model) == parameter_count(model.backbone) + parameter_count(model.pool)
    model.freeze_backbone()
    assert parameter_count(model, trainable_only=True) == parameter_count(model.pool)


def pooled_with(pool, attention, features):
    """What SimPool2d's forward computes from its values with ``attention`` [B, heads, N] as the weights."""
    value = values(pool, features)
    weights = attention.unsqueeze(2)  # [B, heads, 1, N]
    if pool.gamma is None:
        pooled = weights @ value
    else:  # the power normalisation of the values, then its inverse
        shifted = value - value.amin(dim=-2, keepdim=True) + 1e-6
        pooled = (weights @ shifted.pow(pool.gamma)).pow(1 / pool.gamma)
    return pooled.transpose(1, 2).reshape(features.shape[:2])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("options", [{}, dict(num_heads=4, qkv_bias=True, qk_norm=True), dict(gamma=2.0),
                                     dict(num_heads=2, gamma=1.5)])
def test_the_attention_reproduces_timms_simpool_output(family, options, fused):
    model = build(family, num_classes=5, **options).eval()
    model.pool.fused_attn = fused  # timm's two paths: scaled_dot_product_attention and its own softmax
    with torch.no_grad():  # a LayerNorm that is not the identity, and peaked attention
        for param in model.pool.norm.parameters():
            param.normal_(1.0, 0.5)
        for linear in (model.pool.q, model.pool.k):
            linear.weight.normal_(0.0, linear.in_features ** -0.25)
        out = model.forward_pool(images(size=96) * 3)
        assert torch.equal(out.pooled, model.pool(out.features))  # the pooled features are timm's forward
        attention = out.attention.flatten(2)
        torch.testing.assert_close(pooled_with(model.pool, attention, out.features), out.pooled)
        # not a coincidence of near-uniform weights: the plain average of the values is far from the output
        uniform = torch.full_like(attention, 1 / attention.shape[-1])
        assert (pooled_with(model.pool, uniform, out.features) - out.pooled).abs().amax() > 0.1
    assert out.attention.shape == (2, model.pool.num_heads, *out.features.shape[-2:])


def test_the_saliency_is_a_distribution_over_positions_shaped_as_castreams(family):
    model, x = build(family, num_classes=5).eval(), images()
    castream = timm.create_model(SMALL[family][0].replace("simpool", "castream"), **SMALL[family][1]).eval()
    with torch.no_grad():
        out, heads = model(x), model.forward_pool(x).attention
        assert out.saliency.shape == castream(x).saliency.shape == (2, SIZE // 32, SIZE // 32)
    assert isinstance(out, zoo.ModelOutput) and (out.saliency >= 0).all()
    torch.testing.assert_close(out.saliency.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(out.saliency, heads.mean(1))
    several = build(family, num_classes=5, num_heads=4).eval()
    with torch.no_grad():
        saliency, heads = several(x).saliency, several.forward_pool(x).attention
    torch.testing.assert_close(saliency, heads.mean(1))  # several heads: their mean, still summing to one
    torch.testing.assert_close(saliency.sum((1, 2)), torch.ones(2))


def test_the_logits_are_the_backbones_features_pooled_by_the_module_then_its_classifier(family):
    model, x = build(family, num_classes=5).eval(), images()
    net = model.backbone
    with torch.no_grad():
        pooled = model.pool(net.forward_features(x))
        expected = net.fc(pooled) if family == "resnet" else net.head.fc(net.head.norm(pooled[:, :, None, None])
                                                                          .flatten(1))
        torch.testing.assert_close(model(x).logits, expected)
        plain = build(family, num_classes=5, return_saliency=False).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(x), model(x).logits)
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + (SIZE // 32) ** 2, model.num_features)
        torch.testing.assert_close(model.forward_head(tokens), model(x).logits)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier() is (net.fc if family == "resnet" else net.head.fc)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="replaces global pooling"):
        model.reset_classifier(3, global_pool="max")


def test_gradient_checkpointing_is_the_backbones_and_gives_the_same_gradients(family):
    model, x = build(family, num_classes=5), images()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        stages = [model.backbone] if family == "resnet" else list(model.backbone.stages)
        assert all(stage.grad_checkpointing == enable for stage in stages)  # timm's own checkpointing
        model(x).logits.sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_the_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode(family):
    model = build(family, num_classes=5, drop_rate=0.5).freeze_backbone().train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.pool.parameters())
    assert model.training and model.pool.training
    assert not any(module.training for module in model.backbone.modules())
    model.freeze_backbone(False)
    assert all(module.training for module in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_step_of_the_stream_recipe_moves_simpool_and_nothing_else(family, tmp_path):
    name, small = SMALL[family]
    recipe = load_recipe("castream_imagenet", model=name, model_args=small, weights=None, data_root=str(tmp_path))
    model = build_model(recipe, 5).train()  # frozen as the recipe says: only what requires grad is optimised
    assert isinstance(model, zoo.SimPool) and model.backbone_frozen
    backbone_before = copy.deepcopy(model.backbone.state_dict())  # classifier and BatchNorm statistics included
    pool_before = copy.deepcopy(model.pool.state_dict())
    optimizer = create_optimizer(recipe, model)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    optimizer.zero_grad()
    Classification()(model, x, y).loss.backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    changed = {key for key, value in model.pool.state_dict().items() if not torch.equal(value, pool_before[key])}
    assert changed == set(pool_before)  # the norm, q and k all learn


@pytest.mark.parametrize("method", ["attention", "gradcam"])
def test_the_built_in_map_and_post_hoc_cams_explain_a_simpool_model(family, method):
    model, x = build(family, num_classes=5).freeze_backbone().train(), images()
    maps = explain(model, x, method)
    assert maps.shape == (2, SIZE, SIZE) and maps.isfinite().all() and maps.min() >= 0 and maps.max() <= 1
    assert maps.amax((1, 2)).eq(1).all()  # not constant maps (which explain turns into zeros)
    assert model.training and not any(module.training for module in model.backbone.modules())  # restored
    assert all(p.requires_grad for p in model.pool.parameters())
    assert default_layer(model) is (
        model.backbone.layer4[-1] if family == "resnet" else model.backbone.stages[-1])


def test_a_checkpoint_round_trips_through_the_hubs_save_and_load_path(family, tmp_path):
    args = dict(num_heads=2, qkv_bias=True, gamma=2.0, **SMALL[family][1])
    model = timm.create_model(SMALL[family][0], num_classes=3, **args).eval()
    with torch.no_grad():
        for param in model.pool.parameters():
            param.normal_()
    folder = tmp_path / "model"
    save_for_hf(model, folder, safe_serialization=True, model_config=dict(num_classes=3), model_args=args)
    assert args.items() <= verify_checkpoint(folder)["model_args"].items()  # the options travel with the weights
    x = images()
    for loaded in (load_model(SMALL[family][0], f"local-dir:{folder}", 3),
                   timm.create_model(f"local-dir:{folder}", pretrained=True)):
        loaded.eval()
        assert loaded.pool.gamma == 2.0 and loaded.pool.num_heads == 2
        with torch.no_grad():
            out, expected = loaded(x), model(x)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.saliency, expected.saliency)


def test_a_plain_backbone_checkpoint_loads_into_the_backbone(tmp_path):
    backbone = timm.create_model("resnet18").eval()
    save_for_hf(backbone, tmp_path / "resnet18", safe_serialization=True)
    file = tmp_path / "resnet18" / "model.safetensors"
    model = timm.create_model("resnet18_simpool", pretrained=True, pretrained_cfg_overlay=dict(file=str(file))).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model.backbone(x), backbone(x))
    new_task = timm.create_model("resnet18_simpool", num_classes=7, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(file)))
    assert new_task(x).logits.shape == (2, 7)
    save_for_hf(timm.create_model("resnet18_simpool", qkv_bias=True), tmp_path / "simpool", safe_serialization=True)
    with pytest.raises(ValueError, match=r"checkpoint does not fit resnet18_simpool: 2 unexpected keys \(e.g. "
                                         r"pool.k.bias, pool.q.bias\).*other pooling options \(num_heads, qkv_bias"):
        timm.create_model("resnet18_simpool", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "simpool" / "model.safetensors")))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="SimPool needs a timm ResNet, ConvNeXt, RegNet backbone; 'vit_tiny_patch"):
        zoo.SimPool(backbone="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="num_heads must divide the last stage's 512 channels, got 3"):
        timm.create_model("resnet18_simpool", num_heads=3)
    with pytest.raises(ValueError, match="gamma must be positive"):
        timm.create_model("resnet18_simpool", gamma=0.0)
    with pytest.raises(ValueError, match="global_pool='avg' cannot be set"):
        timm.create_model("resnet18_simpool", global_pool="avg")
    with pytest.raises(ValueError, match="too small for resnet18_simpool"):
        timm.create_model("resnet18_simpool")(torch.randn(1, 3, 16, 16))
