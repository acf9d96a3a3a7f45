"""Saliency on vision transformers and VGG: patch tokens as maps (agreement with pytorch-grad-cam given its
reshape transform), the attention baselines on hand-checkable cases, TIBAV's LRP rules by hand and its map
against a per-image implementation through autograd, the harness' Table 2.2 / 2.7 layout, bad input."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from data_layouts import CubImage, make_cub
from pytorch_grad_cam import GradCAM
from scripts import run_script
from test_saliency import REFERENCE as CNN_REFERENCE
from test_saliency import assert_same_maps, photo_batch, pytorch_grad_cam
from timm.layers import PatchEmbed
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from zoo.evaluation.harness import comparison, main
from zoo.evaluation.saliency import METHODS, default_layer, explain, lrp, normalise_per_image
from zoo.evaluation.saliency.transformer import recorded_attentions, relevance, rollout

# Ablation-CAM ablates tokens differently from pytorch-grad-cam's ViT ablation: checked by hand below
REFERENCE = {name: cls for name, cls in CNN_REFERENCE.items() if name != "ablationcam"}
SIZE = 64
TARGETS = torch.tensor([3, 7, 1])


def tiny(name="vit_tiny_patch16_224", **kwargs):
    """A random-initialised timm transformer with two blocks, at 64 px unless told otherwise."""
    torch.manual_seed(0)
    return timm.create_model(name, **{"img_size": SIZE, "depth": 2, "num_classes": 10, **kwargs}).eval()


@pytest.fixture(scope="module")
def vit():
    return tiny()


def on_tokens(cls, prefix, grid):
    """A pytorch-grad-cam method with its ViT reshape transform, for the prefix count and grid at hand."""
    def reshape(tokens):
        return tokens[:, prefix:].reshape(len(tokens), *grid, tokens.shape[2]).permute(0, 3, 1, 2)

    return lambda model, target_layers: cls(model=model, target_layers=target_layers, reshape_transform=reshape)


def no_hooks_left(model):
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_cam_methods_agree_with_pytorch_grad_cam_on_a_vit(vit, method, monkeypatch):
    images = photo_batch(vit, SIZE)
    # Score-CAM: pytorch-grad-cam upsamples the masks with align_corners=True, we with False (evaluation/README);
    # from a 4x4 grid that moves the masks enough to change which channel wins the softmax, so set it to ours
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d",
                        lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False))
    assert default_layer(vit) is vit.blocks[-1].norm1
    reference = pytorch_grad_cam(on_tokens(REFERENCE[method], 1, (4, 4)), vit, vit.blocks[-1].norm1, images, TARGETS)
    assert_same_maps(explain(vit, images, method, TARGETS), reference)


@pytest.mark.parametrize("name, kwargs, size, prefix", [
    ("deit_tiny_distilled_patch16_224", {}, (64, 64), 2),  # class and distillation tokens
    ("vit_tiny_patch16_224", dict(reg_tokens=4), (64, 64), 5),  # class and four register tokens
    ("vit_tiny_patch16_224", dict(dynamic_img_size=True), (48, 96), 1),  # another size, not square
    ("vit_tiny_patch16_224", dict(dynamic_img_size=True, dynamic_img_pad=True), (56, 72), 1),  # padded patches
])
def test_prefix_tokens_and_grid_come_from_the_model(name, kwargs, size, prefix):
    model = tiny(name, **kwargs)
    assert model.num_prefix_tokens == prefix
    images = torch.randn(3, 3, *size)
    grid = (-(-size[0] // 16), -(-size[1] // 16))
    ours = explain(model, images, "gradcam", TARGETS)
    assert ours.shape == (3, *size)
    assert_same_maps(ours, pytorch_grad_cam(on_tokens(GradCAM, prefix, grid), model, model.blocks[-1].norm1,
                                            images, TARGETS))


def test_ablationcam_zeroes_one_channel_of_the_patch_tokens(vit):
    """Eq. 1.9 by hand: the map A^k of a token layer is channel k of the patch tokens; the class token keeps
    its value (pytorch-grad-cam's ViT ablation sets that channel of every token to min - 1e7 instead)."""
    images, layer = photo_batch(vit, SIZE, noise=0), vit.blocks[-1].norm1
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        base = vit(images)[0, 3]
    handle.remove()
    tokens = captured[0]
    weights = torch.empty(tokens.shape[2])
    for k in range(len(weights)):
        ablated = tokens.clone()
        ablated[:, 1:, k] = 0
        handle = layer.register_forward_hook(lambda module, inputs, output, replacement=ablated: replacement)
        with torch.no_grad():
            weights[k] = (base - vit(images)[0, 3]) / (base + 1e-7)
        handle.remove()
    expected = torch.einsum("k,bkhw->bhw", weights, tokens[:, 1:].transpose(1, 2).unflatten(2, (4, 4))).relu()
    torch.testing.assert_close(explain(vit, images, "ablationcam", torch.tensor([3])),
                               normalise_per_image(expected, (SIZE, SIZE)), atol=1e-4, rtol=1e-4)


def test_opticam_raises_the_target_logit_on_a_vit(vit):
    images = photo_batch(vit, SIZE)
    mean, std = (torch.tensor(vit.pretrained_cfg[key])[:, None, None] for key in ("mean", "std"))

    def masked_score(maps):  # the objective of eq. 2.6, masking in pixel space
        with torch.no_grad():
            return vit(((images * std + mean) * maps[:, None] - mean) / std).gather(1, TARGETS[:, None]).squeeze(1)

    uniform = explain(vit, images, "opticam", TARGETS, iterations=0)  # the starting point: equal weights
    assert (masked_score(explain(vit, images, "opticam", TARGETS, iterations=20)) > masked_score(uniform)).all()


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"attention"}))  # attention: a zoo model's built-in map
def test_every_method_keeps_the_contract_on_a_vit(method):
    model = tiny(num_classes=5)
    model.train()
    model.head.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():  # explain enables gradients itself
        maps = explain(model, torch.randn(2, 3, SIZE, SIZE), method, torch.tensor([1, 4]),
                       **(dict(iterations=3) if method == "opticam" else {}))
    assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    assert all(module.training for module in model.modules())
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(block.attn.fused_attn for block in model.blocks) and no_hooks_left(model)


def test_vgg16_bn_default_is_the_last_convolution_before_the_last_max_pool():
    torch.manual_seed(0)
    model = timm.create_model("vgg16_bn", num_classes=10).eval()
    assert default_layer(model) is model.features[42]  # conv5_3 -> BN -> ReLU, then the last max-pool
    with torch.device("meta"):  # only its structure is needed
        torchvision_vgg = torchvision.models.vgg16_bn()
    assert default_layer(torchvision_vgg) is torchvision_vgg.features[42]
    images = photo_batch(model, SIZE)
    assert_same_maps(explain(model, images, "gradcam", TARGETS),
                     pytorch_grad_cam(GradCAM, model, model.features[42], images, TARGETS))


# --- the attention baselines ---------------------------------------------------------------------------------


def test_rollout_by_hand():
    # identity attentions: every token keeps to itself, the class token's row has nothing on the patches
    identity = [torch.eye(5).expand(2, 3, 5, 5)] * 4
    torch.testing.assert_close(rollout(identity), torch.eye(5).expand(2, 5, 5))
    # uniform attentions: (U + I) / 2 with U = 1/N everywhere; U is idempotent, so the product is
    # I / 2^L + (1 - 1/2^L) U: the class token's row is uniform over the patches
    uniform = [torch.full((1, 2, 4, 4), 0.25)] * 3
    torch.testing.assert_close(rollout(uniform)[0], torch.eye(4) / 8 + 7 / 8 * torch.full((4, 4), 0.25))
    # one block, two heads: the head mean, then (A + I) / 2
    heads = torch.tensor([[[0.5, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]]])[None]
    torch.testing.assert_close(rollout([heads])[0], torch.tensor([[0.875, 0.125], [0.125, 0.875]]))


def test_relevance_by_hand():
    # R = (I + Ā2)(I + Ā1), Ā = head mean of the positive part of gradient x attention
    a1, g1 = torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([[2.0, -2.0], [4.0, 0.0]])  # Ā1 = [[1, 0], [1, 0]]
    a2, g2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # Ā2 = [[0, 0], [0, 3]]
    result = relevance([a1[None, None], a2[None, None]], [g1[None, None], g2[None, None]])
    torch.testing.assert_close(result[0], torch.tensor([[2.0, 0.0], [4.0, 4.0]]))
    # two heads: the mean of the positive parts, not the positive part of the mean
    two_heads = relevance([torch.ones(1, 2, 2, 2)], [torch.tensor([[[[1.0, -1.0]] * 2, [[-3.0, 1.0]] * 2]])])
    torch.testing.assert_close(two_heads[0], torch.tensor([[1.5, 0.5], [0.5, 1.5]]))


def attention_by_hand(model, images, block):
    """softmax(q k^T / sqrt(d)) of ``block`` from its input, computed here from the qkv weights."""
    inputs = []
    handle = block.norm1.register_forward_hook(lambda module, args, output: inputs.append(output))
    with torch.no_grad():
        model(images)
    handle.remove()
    attn = block.attn
    q, k, _ = attn.qkv(inputs[0]).unflatten(2, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)


def test_raw_attention_is_the_class_token_softmax_row(vit):
    images = photo_batch(vit, SIZE)
    row = attention_by_hand(vit, images, vit.blocks[-1]).mean(1)[:, 0, 1:].unflatten(1, (4, 4))
    torch.testing.assert_close(explain(vit, images, "rawattention"), normalise_per_image(row, (SIZE, SIZE)))
    assert all(block.attn.fused_attn for block in vit.blocks)


def test_generic_attention_on_one_block_is_the_positive_gradient_times_attention_row():
    """One block: R = I + Ā, so the map is the class token's row of Ā = mean_h (dy_c/dA ⊙ A)^+, with
    dy_c/dA taken here through a forward written out by hand from the block's parts."""
    model = tiny(depth=1)
    images, block = torch.randn(2, 3, SIZE, SIZE), model.blocks[0]
    targets = torch.tensor([2, 5])
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    attention = attention_by_hand(model, images, block).requires_grad_()
    v = block.attn.qkv(block.norm1(x)).unflatten(2, (3, block.attn.num_heads, -1)).permute(2, 0, 3, 1, 4)[2]
    x = x + block.ls1(block.attn.proj((attention @ v).transpose(1, 2).flatten(2)))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    logits = model.forward_head(model.norm(x))
    grad = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attention)[0]
    row = (grad * attention).clamp_min(0).mean(1)[:, 0, 1:].unflatten(1, (4, 4))
    ours = explain(model, images, "generic_attention", targets)
    torch.testing.assert_close(ours, normalise_per_image(row.detach(), (64, 64)))
    assert not torch.allclose(ours, explain(model, images, "generic_attention", 9 - targets))


def test_attention_flags_and_hooks_are_restored_when_the_forward_fails():
    model = tiny()

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken norm")

    model.norm = Broken()  # after every block has run (and recorded)
    for method in ("rawattention", "rollout", "generic_attention", "tibav"):
        with pytest.raises(RuntimeError, match="broken norm"):
            explain(model, torch.randn(1, 3, SIZE, SIZE), method)
        assert all(block.attn.fused_attn for block in model.blocks) and no_hooks_left(model)


def test_attention_methods_are_batched(vit):
    images = photo_batch(vit, SIZE)
    for method in ("rawattention", "rollout", "generic_attention", "tibav"):
        batched = explain(vit, images, method, TARGETS)
        for i in range(len(images)):
            torch.testing.assert_close(batched[i], explain(vit, images[i:i + 1], method, TARGETS[i:i + 1])[0],
                                       atol=1e-5, rtol=1e-5)


# --- TIBAV (Chefer et al. 2021, CVPR): the LRP rules, then the whole propagation ---------------------------------


def test_linear_rule_by_hand():
    # x = [1, -2], W = [[1, -1], [2, 3]]. Output 0 has the positive contributions 1·1 and (-2)·(-1) = 2, so x takes
    # 1/3 and 2/3 of R_0 = 3; output 1 has 1·2 (positive) and (-2)·3 (negative: ignored with α = 1, β = 0), so
    # x_0 takes all of R_1 = 4: R_x = [1 + 4, 2]
    x, weight, r = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, -1.0], [2.0, 3.0]]), torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(lrp.linear_relevance(x, weight, r), torch.tensor([[5.0, 2.0]]))
    # α = 2, β = 1: twice that, less the negative contributions' share: all of R_1 to x_1, for its -6
    torch.testing.assert_close(lrp.linear_relevance(x, weight, r, alpha=2.0), torch.tensor([[10.0, 0.0]]))
    # an input of zeros has no contribution to share: zero relevance, not NaN
    assert (lrp.linear_relevance(torch.zeros(1, 2), weight, r) == 0).all()


def test_linear_rule_conserves_relevance():
    torch.manual_seed(0)
    r = torch.randn(2, 5, 4)
    x, weight = torch.rand(2, 5, 6), torch.rand(4, 6)  # positive inputs and weights: every contribution counts
    torch.testing.assert_close(lrp.linear_relevance(x, weight, r).sum(-1), r.sum(-1))
    # α = 1, β = 0 shares each output's relevance among its positive contributions only, so any signs conserve
    x, weight = torch.randn(2, 5, 6), torch.randn(4, 6)
    torch.testing.assert_close(lrp.linear_relevance(x, weight, r).sum(-1), r.sum(-1))


def test_product_rule_is_gradient_times_input():
    torch.manual_seed(0)
    x, y, r = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6), torch.randn(2, 3, 4, 6)
    leaves = x.clone().requires_grad_(), y.clone().requires_grad_()
    z = leaves[0] @ leaves[1]
    grad_x, grad_y = torch.autograd.grad(z, leaves, r / z)
    r_x, r_y = lrp.product_relevance(x, y, r)
    torch.testing.assert_close(r_x, x * grad_x)
    torch.testing.assert_close(r_y, y * grad_y)
    # each operand gets all of R (per image and head), so halving both keeps the total
    torch.testing.assert_close(r_x.sum((-2, -1)), r.sum((-2, -1)))
    torch.testing.assert_close(r_y.sum((-2, -1)), r.sum((-2, -1)))
    # q's scale d^-1/2 changes nothing: it scales Z by c and S = R / Z by 1/c
    for scaled, unscaled in zip(lrp.product_relevance(x * 0.125, y, r), (r_x, r_y), strict=True):
        torch.testing.assert_close(scaled, unscaled)


def test_addition_rule_splits_each_images_relevance_in_proportion():
    torch.manual_seed(0)
    a, b, r = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    r_a, r_b = lrp.addition_relevance(a, b, r)
    for i in range(3):
        term_a, term_b = a[i] * r[i] / (a[i] + b[i]), b[i] * r[i] / (a[i] + b[i])  # gradient x input
        share = term_a.sum().abs() / (term_a.sum().abs() + term_b.sum().abs())
        torch.testing.assert_close(r_a[i].sum(), share * r[i].sum())
        torch.testing.assert_close(r_b[i].sum(), (1 - share) * r[i].sum())
        torch.testing.assert_close(r_a[i], term_a * r_a[i].sum() / term_a.sum())  # rescaled, not reshaped
        torch.testing.assert_close(r_b[i], term_b * r_b[i].sum() / term_b.sum())
    alone = lrp.addition_relevance(a[1:2], b[1:2], r[1:2])  # an image's split does not depend on the batch
    torch.testing.assert_close(alone[0], r_a[1:2])
    torch.testing.assert_close(alone[1], r_b[1:2])


def test_relevance_is_conserved_through_every_block():
    """α = 1, β = 0 shares among positive contributions only, gradient x input of a product gives each operand
    the whole relevance (halved), additions are rescaled to their total, the rest passes it unchanged: each
    block's input gets exactly the relevance at its output, for activations of any sign; its attention
    probabilities get half of what reaches the attention."""
    model = tiny(depth=2, init_values=0.5)
    with lrp.recorded_layers(model, "vit") as layers, recorded_attentions(model, "vit") as attentions, torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    r = lrp.token_relevance(model, layers, torch.tensor([2, 5]))
    assert (r[:, 1:] == 0).all()  # class-token pooling
    torch.testing.assert_close(r.sum((1, 2)), torch.ones(2))  # the one-hot target, through the head
    for block, attention in zip(reversed(model.blocks), reversed(attentions), strict=True):
        r_attn, r_attention = lrp.attention_block_relevance(block.attn, layers, attention, r)
        torch.testing.assert_close(r_attn.sum((1, 2)), r.sum((1, 2)))
        torch.testing.assert_close(r_attention.sum((1, 2, 3)), r.sum((1, 2)) / 2)
        r, _ = lrp.block_relevance(block, layers, attention, r)
        torch.testing.assert_close(r.sum((1, 2)), torch.ones(2))


def tibav_by_hand(model, image, target):
    """TIBAV's map for one image, written out: the forward from the model's parts; every LRP rule as gradient x
    input through autograd on that rule's own function (α1β0: x⁺ and x⁻ through W⁺ and W⁻), reshapes undone
    by autograd; then C = (I + Ā_L) ... (I + Ā_1), Ā = mean_h (∇A ⊙ R_A)^+, and the class token's row."""
    def gradient_times_input(fn, inputs, relevance):
        inputs = [t.detach().requires_grad_() for t in inputs]
        z = fn(*inputs)
        return [t.detach() * g for t, g in zip(inputs, torch.autograd.grad(z, inputs, relevance / z), strict=True)]

    def linear(x, weight, relevance):
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        parts = gradient_times_input(lambda p, n: F.linear(p, w_pos) + F.linear(n, w_neg),
                                     [x.clamp(min=0), x.clamp(max=0)], relevance)
        return parts[0] + parts[1]

    def add(a, b, relevance):
        r_a, r_b = gradient_times_input(torch.add, [a, b], relevance)
        total = r_a.sum().abs() + r_b.sum().abs()
        return (r_a * r_a.sum().abs() / total * relevance.sum() / r_a.sum(),
                r_b * r_b.sum().abs() / total * relevance.sum() / r_b.sum())

    def moved(output, source, relevance):  # relevance of a reshaped / permuted copy, put back on its source
        return torch.autograd.grad(output, source, relevance, retain_graph=True)

    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
    steps = []
    for block in model.blocks:
        attn = block.attn
        normed = block.norm1(x)
        qkv = attn.qkv(normed)
        q, k, v = qkv.reshape(1, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        mixed = attention @ v
        heads = mixed.transpose(1, 2).flatten(2)
        branch1 = block.ls1(attn.proj(heads))
        h = x + branch1
        normed2 = block.norm2(h)
        hidden = block.mlp.act(block.mlp.fc1(normed2))
        branch2 = block.ls2(block.mlp.fc2(hidden))
        steps.append(dict(x=x, normed=normed, qkv=qkv, q=q, k=k, v=v, attention=attention, mixed=mixed,
                          heads=heads, branch1=branch1, h=h, normed2=normed2, hidden=hidden, branch2=branch2))
        x = h + branch2
    tokens = model.norm(x)
    one_hot = torch.zeros(1, model.num_classes)
    one_hot[0, target] = 1
    r = torch.zeros_like(tokens)
    if hasattr(model, "head_dist"):  # distilled DeiT: the mean of the class token's and distillation token's heads
        cls_half, dist_half = model.head(tokens[:, 0]) / 2, model.head_dist(tokens[:, 1]) / 2
        logits = cls_half + dist_half
        r_cls, r_dist = add(cls_half, dist_half, one_hot)  # then y = x / 2 passes relevance unchanged
        r[:, 0] = linear(tokens[:, 0], model.head.weight, r_cls)
        r[:, 1] = linear(tokens[:, 1], model.head_dist.weight, r_dist)
    else:
        pooled = model.fc_norm(tokens[:, 0])
        logits = model.head(pooled)
        r[:, 0] = linear(pooled, model.head.weight, one_hot)
    gradients = torch.autograd.grad(logits[0, target], [step["attention"] for step in steps], retain_graph=True)
    relevances = []
    for block, step in zip(reversed(model.blocks), reversed(steps), strict=True):
        r_h, r_branch2 = add(step["h"], step["branch2"], r)
        r_hidden = linear(step["hidden"], block.mlp.fc2.weight, r_branch2)
        r_h = r_h + linear(step["normed2"], block.mlp.fc1.weight, r_hidden)
        r_x, r_branch1 = add(step["x"], step["branch1"], r_h)
        (r_mixed,) = moved(step["heads"], step["mixed"], linear(step["heads"], block.attn.proj.weight, r_branch1))
        r_attention, r_v = (t / 2 for t in gradient_times_input(torch.matmul, [step["attention"], step["v"]], r_mixed))
        relevances.insert(0, r_attention)
        r_q, r_k = (t / 2 for t in gradient_times_input(lambda q, k: q @ k.transpose(-2, -1), [step["q"], step["k"]],
                                                         r_attention))
        (r_qkv,) = moved([step["q"], step["k"], step["v"]], step["qkv"], [r_q, r_k, r_v])
        r = r_x + linear(step["normed"], block.attn.qkv.weight, r_qkv)
    eye = torch.eye(tokens.shape[1])
    joint = eye
    for gradient, r_attention in zip(gradients, relevances, strict=True):
        joint = (eye + (gradient * r_attention).clamp(min=0).mean(1)[0]) @ joint
    return joint[0, model.num_prefix_tokens:].reshape(4, 4).detach()


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", dict(depth=1)),
    ("vit_tiny_patch16_224", dict(depth=2, init_values=0.5)),  # LayerScale, and relevance through a whole block
    # two prefix tokens and two heads; two blocks, since with one the class token's row only sees the class head's
    ("deit_tiny_distilled_patch16_224", dict(depth=2)),
])
def test_tibav_equals_a_per_image_implementation_through_autograd(name, kwargs):
    model = tiny(name, **kwargs)
    images, targets = torch.randn(2, 3, SIZE, SIZE), torch.tensor([2, 5])
    expected = normalise_per_image(torch.stack([tibav_by_hand(model, image, target)
                                                for image, target in zip(images, targets, strict=True)]), (SIZE, SIZE))
    ours = explain(model, images, "tibav", targets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(ours).all() and 0 <= ours.min() < ours.max() <= 1
    assert not torch.allclose(ours, explain(model, images, "tibav", 9 - targets), atol=1e-3)  # class-specific
    assert METHODS["chefer"] is METHODS["tibav"] and METHODS["generic_attention"] is not METHODS["tibav"]
    assert not torch.allclose(ours, explain(model, images, "generic_attention", targets), atol=1e-3)
    assert all(block.attn.fused_attn for block in model.blocks) and no_hooks_left(model)


# --- bad input ----------------------------------------------------------------------------------------------


class Merged(nn.Module):
    """Patch tokens of which every other one is dropped: too few for the patch grid."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=32, patch_size=8, embed_dim=8)
        self.merge = nn.Identity()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.merge(self.patch_embed(x)[:, ::2]).mean(1))


class Tokens(nn.Module):
    """Tokens made without a patch embedding: nothing says where they lie."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.embed(x.flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("call, message", [
    (lambda: explain(tiny(dynamic_img_size=True), torch.randn(1, 3, 70, 64), "gradcam"),
     "a 70x64 input does not divide into the 16x16 patches of vit_tiny_patch16_224's patch_embed"),
    (lambda: explain(tiny(), torch.randn(1, 3, 96, 96), "rollout"),
     "vit_tiny_patch16_224 takes 64x64 inputs only .* dynamic_img_size=True"),
    (lambda: explain(Merged(), torch.randn(1, 3, 32, 32), "gradcam", layer="merge"),
     "layer Identity of Merged outputs 8 tokens at 'merge', .* cannot be mapped to a grid"),
    (lambda: explain(Tokens(), torch.randn(1, 3, 8, 8), "gradcam", layer="embed"),
     "layer Linear of Tokens outputs tokens .* at 'embed', but Tokens has no patch embedding"),
    (lambda: explain(tiny(), torch.randn(1, 3, SIZE, SIZE), "gradcam", layer="head"),
     r"layer Linear of vit_tiny_patch16_224 does not output a feature map \[B, C, h, w\] or tokens .* from 'head'"),
    (lambda: explain(tiny(), torch.randn(1, 3, SIZE, SIZE), "gradcam", layer="blocks.1"),
     r"depend on no patch token of layer Block \('blocks.1'\)"),
    (lambda: explain(tiny("test_vit2"), torch.randn(1, 3, SIZE, SIZE), "chefer"),
     "test_vit2 has no class token"),
    (lambda: explain(tiny("test_vit2"), torch.randn(1, 3, SIZE, SIZE), "generic_attention"),
     "test_vit2 has no class token"),
    (lambda: explain(timm.create_model("resnet18"), torch.randn(1, 3, SIZE, SIZE), "tibav"),
     "resnet18 is not a timm VisionTransformer"),
    (lambda: explain(tiny(qk_norm=True), torch.randn(1, 3, SIZE, SIZE), "tibav"),
     r"vit_tiny_patch16_224 normalises queries and keys \(qk_norm\) in blocks\[0\]"),
    (lambda: explain(tiny(class_token=True, global_pool="avg"), torch.randn(1, 3, SIZE, SIZE), "tibav"),
     "vit_tiny_patch16_224 pools its tokens with global_pool='avg', not by its class token"),
    (lambda: explain(tiny(num_classes=0), torch.randn(1, 3, SIZE, SIZE), "tibav"),
     "vit_tiny_patch16_224 has no linear classifier head"),
    (lambda: explain(tiny(block_fn=ResPostBlock), torch.randn(1, 3, SIZE, SIZE), "tibav"),
     r"vit_tiny_patch16_224 has a ResPostBlock with Attention at blocks\[0\]"),
    (lambda: explain(timm.create_model("resnet18"), torch.randn(1, 3, SIZE, SIZE), "rollout"),
     "resnet18 has no timm attention blocks"),
])
def test_bad_input_names_the_model_and_layer(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the harness ----------------------------------------------------------------------------------------------


def test_harness_runs_a_vit_with_the_attention_baselines(tmp_path):
    make_cub(tmp_path / "data", images=tuple(CubImage(1 + i % 2, False, (8, 8, 40, 30)) for i in range(3)))
    main(["test_vit", "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--methods", "gradcam",
          "rawattention", "rollout", "generic_attention", "tibav", "fakecam", "--metrics", "faithfulness",
          "localisation", "--img-size", "64", "--batch-size", "2", "--cpu", "--out", str(tmp_path / "out")])
    (run_dir,) = (tmp_path / "out").iterdir()
    methods = json.loads((run_dir / "results.json").read_text())["methods"]
    assert all({"AD", "AG", "AI", "OM", "LE", "SP", "seconds_per_image"} <= set(methods[m]) for m in methods)


def test_tables_2_2_and_2_7_set_models_side_by_side():
    def run(model, seconds):
        values = dict(AD=1.0, AG=2.0, AI=3.0, OM=4.0, LE=5.0, F1=6.0, BA=7.0, SP=8.0, EP=9.0, SM=0.5,
                      seconds_per_image=seconds)
        return dict(protocol=dict(model=model), methods={"fakecam": values, "rollout": values})

    table = comparison([run("vit_base_patch16_224", 0.25), run("deit_base_patch16_224", 2.0)], by_model=True)
    assert ("| method | vit_base_patch16_224 AD↓ | vit_base_patch16_224 AG↑ | vit_base_patch16_224 AI↑ | "
            "vit_base_patch16_224 T | deit_base_patch16_224 AD↓ |") in table  # Table 2.2, T per batch of 8
    assert "| rollout | 1.00 | 2.00 | 3.00 | 2.00 | 1.00 | 2.00 | 3.00 | 16.00 |" in table
    assert ("| method | vit_base_patch16_224 OM↓ | vit_base_patch16_224 LE↓ | vit_base_patch16_224 F1↑ | "
            "vit_base_patch16_224 BA↑ | vit_base_patch16_224 SP↑ | vit_base_patch16_224 EP↑ | "
            "vit_base_patch16_224 SM↓ | deit_base_patch16_224 OM↓ |") in table  # Table 2.7
    assert "| fakecam | 4.00 | 5.00 | 6.00 | 7.00 | 8.00 | 9.00 | 0.50 | 4.00 |" in table


def test_speed_benchmark_runs_side_by_side(tmp_path):
    run_script("benchmarks/saliency_transformer_speed.py", ["--quick", "--rounds", "1", "--device", "cpu",
                                                            "--out", str(tmp_path)])
    (result,) = tmp_path.glob("saliency_transformer_speed-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["method"], r["model"]) for r in rows] == [("opticam", "test_vit"), ("opticam", "test_resnet"),
                                                         ("scorecam", "test_vit"), ("scorecam", "test_resnet")]
    assert rows[0]["forwards_per_image"] == 3  # the capture, then one per iteration
    assert rows[2]["forwards_per_image"] == 1 + rows[2]["channels"]  # the capture, then one per distinct mask
