"""Frozen-backbone training (thesis §3.3): only the stream learns, the backbone does not move."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from zoo.models.cost import parameter_count


@pytest.fixture(params=["resnet18_castream", "convnext_tiny_castream"])
def model(request):
    kwargs = dict(backbone="convnext_atto") if request.param.startswith("convnext") else {}
    return timm.create_model(request.param, num_classes=5, drop_rate=0.5, **kwargs)


def test_freezing_leaves_only_the_stream_trainable(model):
    model.freeze_backbone()
    assert parameter_count(model, trainable_only=True) == parameter_count(model.stream) > 0
    model.freeze_backbone(False)
    assert parameter_count(model, trainable_only=True) == parameter_count(model)


def test_frozen_backbone_stays_in_eval_mode(model):
    model.freeze_backbone().train()
    assert model.training and model.stream.training
    assert not any(module.training for module in model.backbone.modules())
    model.freeze_backbone(False)
    assert all(module.training for module in model.backbone.modules())


def test_a_training_step_moves_the_stream_and_nothing_else(model):
    model.freeze_backbone().train()
    backbone_before = copy.deepcopy(model.backbone.state_dict())  # weights and BatchNorm statistics
    stream_before = copy.deepcopy(model.stream.state_dict())
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    features_before = model.backbone.forward_features(x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=1e-4)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x).logits, y).backward()
        optimizer.step()
    assert model.stream.query.grad is not None
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    torch.testing.assert_close(model.backbone.forward_features(x), features_before, rtol=0, atol=0)
    changed = [key for key, value in model.stream.state_dict().items() if not torch.equal(value, stream_before[key])]
    assert "query" in changed and any(key.endswith("proj.weight") for key in changed)


@pytest.mark.parametrize("name, kwargs", [("resnet18_castream", {}),
                                          ("convnext_tiny_castream", dict(backbone="convnext_atto"))])
def test_gradient_checkpointing_gives_the_same_gradients(name, kwargs):
    model, x = timm.create_model(name, num_classes=5, **kwargs), torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).logits.sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
