"""Gradient denoising (thesis ch. 4): the two input gradients, the error functions, the objective."""

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop
from torch import nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack

from zoo.guided import switchable_relu
from zoo.training import double_backward
from zoo.training.double_backward import lean_double_backward
from zoo.training.gradient_denoising import (
    ERRORS,
    GradientDenoising,
    cosine_error,
    histogram_intersection_error,
    input_gradients,
    mean_absolute_error,
    mean_squared_error,
)
from zoo.training.objectives import classification_loss

NUM_CLASSES = 5


class TinyNet(nn.Module):
    """Two conv layers and a linear head; the activation called as a module, functionally or in place."""

    def __init__(self, activation: str = "module", batchnorm: bool = True):
        super().__init__()
        self.activation = activation
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = self.norm(self.conv1(x))
        if self.activation == "module":
            y = self.act2(self.conv2(self.act1(x)))
        elif self.activation == "functional":
            y = torch.relu(self.conv2(F.relu(x)))
        else:  # in place
            y = self.conv2(x.relu_())
            y.relu_()
        return self.fc(y.mean((2, 3)))


class PerSampleLoss(nn.Module):
    """The model's per-sample loss as its only output column, so captum attributes the same quantity."""

    def __init__(self, model, labels, sign=1.0):
        super().__init__()
        self.model, self.labels, self.sign = model, labels, sign

    def forward(self, x):
        logits = self.model(x)
        if self.labels.ndim == 2:
            loss = F.binary_cross_entropy_with_logits(logits, self.labels, reduction="none").mean(1)
        else:
            loss = F.cross_entropy(logits, self.labels, reduction="none")
        return self.sign * loss[:, None]


def batch(size=8, count=4, multi_hot=False, classes=NUM_CLASSES):
    images = torch.randn(count, 3, size, size)
    labels = (torch.rand(count, classes) < 0.4).float() if multi_hot else torch.randint(classes, (count,))
    return images, labels


def captum_guided(model, images, labels, sign=1.0):
    return GuidedBackprop(PerSampleLoss(model, labels, sign)).attribute(images.clone().requires_grad_(), target=0)


@pytest.mark.parametrize("multi_hot", [False, True], ids=["cross-entropy", "multi-hot"])
@pytest.mark.parametrize("name", ["tiny", "timm_resnet18"])
def test_guided_gradient_agrees_with_captum(name, multi_hot):
    model = TinyNet() if name == "tiny" else timm.create_model("resnet18", num_classes=NUM_CLASSES)  # in-place ReLUs
    model.eval()
    images, labels = batch(16 if name == "timm_resnet18" else 8, multi_hot=multi_hot)
    ours = input_gradients(model, images, labels).guided
    torch.testing.assert_close(ours, captum_guided(model, images, labels))
    # guided backprop is not sign-symmetric: that of -loss, negated, is a different map
    assert (ours + captum_guided(model, images, labels, sign=-1.0)).abs().max() > 0.1 * ours.abs().max()


@pytest.mark.parametrize("activation", ["functional", "inplace"])
def test_guided_gradient_of_functional_relus_matches_captum_on_modules(activation):
    modules, functional = TinyNet("module").eval(), TinyNet(activation).eval()
    functional.load_state_dict(modules.state_dict())
    images, labels = batch()
    torch.testing.assert_close(input_gradients(functional, images, labels).guided,
                               captum_guided(modules, images, labels))


class ReLU6Net(nn.Module):
    """x -> relu6(W1 x + b1) -> relu6(W2 h1 + b2) -> W3 h2 + b3, the ReLU6 called three different ways."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 10), nn.Linear(10, NUM_CLASSES)

    def relu6(self, x):
        if self.how == "module":
            return nn.ReLU6()(x)
        if self.how == "inplace":
            return F.relu6(x, inplace=True)
        return F.hardtanh(x, 0.0, 6.0)

    def forward(self, x):
        return self.fc3(self.relu6(self.fc2(self.relu6(self.fc1(x.flatten(1))))))


@pytest.mark.parametrize("how", ["module", "inplace", "hardtanh"])
def test_guided_gradient_through_relu6_by_hand(how):
    model = ReLU6Net(how)
    with torch.no_grad():  # pre-activations spread over (-inf, 0), (0, 6) and (6, inf)
        model.fc1.weight.mul_(8), model.fc2.weight.mul_(8)
    images, labels = torch.randn(6, 3, 2, 2), torch.randint(NUM_CLASSES, (6,))
    x = images.flatten(1)
    pre1 = model.fc1(x)
    pre2 = model.fc2(pre1.clamp(0, 6))
    upstream = F.softmax(model.fc3(pre2.clamp(0, 6)), 1) - F.one_hot(labels, NUM_CLASSES)  # d CE / d logits
    passing1, passing2 = (pre1 > 0) & (pre1 < 6), (pre2 > 0) & (pre2 < 6)
    assert passing2.any() and not passing2.all() and (pre2 >= 6).any()
    guided2 = (upstream @ model.fc3.weight).clamp(min=0) * passing2
    guided1 = (guided2 @ model.fc2.weight).clamp(min=0) * passing1
    expected = (guided1 @ model.fc1.weight).view_as(images).detach()
    torch.testing.assert_close(input_gradients(model, images, labels).guided, expected)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050"])  # in-place ReLU; ReLU6
def test_standard_gradient_and_its_derivative_equal_plain_autograd(name):
    # float64: in float32 these random networks' second derivatives are ill-conditioned (relative differences up
    # to 1e-3 between any two summation orders, torch's own against float64 included)
    model = timm.create_model(name, num_classes=NUM_CLASSES).train().double()
    images, labels = batch(16)
    images = images.double()
    ours = input_gradients(model, images, labels).standard

    plain_images = images.clone().requires_grad_(True)
    plain_loss = F.cross_entropy(model(plain_images), labels, reduction="sum")
    (plain,) = torch.autograd.grad(plain_loss, plain_images, create_graph=True)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    # differentiable as autograd's own: the same parameter gradients of a function of the input gradient, up to
    # rounding (double_backward.py sums the second derivatives in another order). All parameters at once: a
    # bias followed by batch norm has an exact gradient of 0, and both sides give rounding noise for it
    params = [p for p in model.parameters() if p.requires_grad]
    ours, plain = (torch.cat([g.flatten() for g in torch.autograd.grad(gradient.square().sum(), params)])
                   for gradient in (ours, plain))
    assert (ours - plain).norm() <= 1e-10 * plain.norm()


@pytest.mark.parametrize("geometry", [
    dict(stride=2, padding=1, dilation=1, groups=1), dict(stride=(2, 1), padding=(0, 2), dilation=2, groups=2),
    dict(stride=2, padding=1, dilation=1, groups=4),  # depthwise, its double backward a per-group loop in torch
])
def test_transposable_convolution_has_torch_values_and_first_and_second_derivatives(geometry):
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6 if geometry["groups"] < 4 else 4, 4 // geometry["groups"], 3, 3, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(len(weight), dtype=torch.float64, requires_grad=True)

    def conv(x, weight, bias):
        with lean_double_backward():
            return F.conv2d(x, weight, bias, **geometry)

    torch.testing.assert_close(conv(x, weight, bias), F.conv2d(x, weight, bias, **geometry), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(conv, (x, weight, bias)) and torch.autograd.gradgradcheck(conv, (x, weight, bias))
    # the derivative of the input gradient, as gradient denoising takes it, against torch's own
    probe, direction = torch.randn_like(conv(x, weight, bias)), torch.randn_like(x)
    second = []
    for convolution in (conv, lambda *args: F.conv2d(*args, **geometry)):
        (input_gradient,) = torch.autograd.grad((convolution(x, weight, bias) * probe).sum(), x, create_graph=True)
        second.append(torch.autograd.grad((input_gradient * direction).sum(), (weight, bias), allow_unused=True))
    torch.testing.assert_close(second[0][0], second[1][0], rtol=0, atol=1e-12)
    assert second[0][1] is None and second[1][1] is None  # the input gradient does not depend on the bias


def primitive_batch_norm(x, weight, bias, eps=1e-5):
    """Training-mode batch norm from elementary operations: autograd's derivatives of any order are exact."""
    dims, shape = [0, *range(2, x.ndim)], [1, -1] + [1] * (x.ndim - 2)
    mean = x.mean(dims, keepdim=True)
    variance = (x - mean).square().mean(dims, keepdim=True)
    return (x - mean) / (variance + eps).sqrt() * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("derivative, shape, memory_format", [
    ("compiled", (4, 3, 5, 6), torch.contiguous_format), ("compiled", (4, 3, 5, 6), torch.channels_last),
    ("compiled", (6, 3), torch.contiguous_format),  # batch norm of features (nn.BatchNorm1d)
    ("eager", (4, 3, 5, 6), torch.contiguous_format)])
def test_lean_batch_norm_has_exact_values_and_first_and_second_derivatives(derivative, shape, memory_format,
                                                                            monkeypatch):
    if derivative == "eager":  # what TORCHDYNAMO_DISABLE=1 runs
        monkeypatch.setattr(double_backward, "_compiled_second_derivative",
                            double_backward.batch_norm_second_derivative)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    weight, bias = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                         requires_grad=True)

    def lean(x, weight, bias):
        with lean_double_backward():
            return F.batch_norm(x, None, None, weight, bias, training=True)

    torch.testing.assert_close(lean(x, weight, bias), primitive_batch_norm(x, weight, bias), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lean, (x, weight, bias)) and torch.autograd.gradgradcheck(lean, (x, weight, bias))
    # every second derivative, along every first one, against the elementary operations' (float64 rounding)
    probe = torch.randn_like(x, requires_grad=True)
    second = []
    for norm in (lean, primitive_batch_norm):
        dx, dweight, dbias = torch.autograd.grad((norm(x, weight, bias) * probe).sum(), (x, weight, bias),
                                                 create_graph=True)
        outer = dx.sin().sum() + dweight.square().sum() + dbias.cos().sum()
        second.append(torch.cat([g.flatten() for g in torch.autograd.grad(outer, (x, weight, probe))]))
    assert (second[0] - second[1]).norm() <= 1e-12 * second[1].norm()


def test_lean_batch_norm_keeps_torchs_running_statistics_and_leaves_other_modes_to_torch(monkeypatch):
    norms = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    recorded = []
    apply = double_backward._BatchNorm.apply
    monkeypatch.setattr(double_backward._BatchNorm, "apply", lambda *args: recorded.append(1) or apply(*args))
    with lean_double_backward():
        ours = norms[0](x)
    theirs = norms[1](x)
    assert recorded == [1]
    torch.testing.assert_close(ours, theirs)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(norms[0], name), getattr(norms[1], name))
    with lean_double_backward():  # eval mode (running statistics) and no affine parameters: torch's own
        norms[0].eval()(x), nn.BatchNorm2d(3, affine=False)(x), nn.BatchNorm2d(3, track_running_stats=False)(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    assert len(recorded) == 2  # only the module without running statistics, as it normalises by the batch


def test_lean_layers_under_bfloat16_autocast_are_torchs_autocast_layers():
    # no bias before the batch norm: its exact derivatives would be 0, and both sides' rounding noise differ
    layers = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    results = []
    for context in (lean_double_backward, contextlib.nullcontext):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with context():
                out = layers(x)
            (input_gradient,) = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
            second = torch.autograd.grad(input_gradient.square().sum(), layers.parameters())
            results.append((out, input_gradient, *second))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype and (ours.float() - theirs.float()).norm() <= 1e-2 * theirs.float().norm()
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32


def test_input_gradient_passes_compute_no_weight_gradient():
    layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with lean_double_backward() as inputs_only:
        out = layers(x).square().sum()
    assert not _get_current_function_mode_stack()  # only the forward ran in the mode
    inputs = (x, *layers.parameters())
    with inputs_only.switched_on():
        grads = torch.autograd.grad(out, inputs, retain_graph=True, allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    assert not inputs_only.on
    expected = torch.autograd.grad(layers(x).square().sum(), inputs)
    for ours, theirs in zip(torch.autograd.grad(out, inputs), expected, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lean_layers_on_cuda_give_torchs_values_and_derivatives(memory_format):
    # on a GPU torch's batch norm runs cuDNN's kernels, whose backward computes every gradient whatever is asked
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4))
    layers = layers.cuda().to(memory_format=memory_format)
    x = torch.randn(8, 3, 12, 12, device="cuda").contiguous(memory_format=memory_format).requires_grad_(True)
    inputs, results = (x, *layers.parameters()), []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for lean in (True, False):
            with lean_double_backward(lean) as inputs_only:
                out = layers(x)
            loss = out.square().sum()
            with inputs_only.switched_on():
                first = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            assert all(g is None for g in first[1:]) == lean  # weight gradients only when asked for
            (input_gradient,) = torch.autograd.grad(loss, x, create_graph=True)
            second = torch.autograd.grad(input_gradient.square().sum() + loss, inputs)
            results.append(torch.cat([t.flatten() for t in (out, input_gradient, *second)]))
    assert (results[0] - results[1]).norm() <= 1e-5 * results[1].norm()


@pytest.mark.parametrize("name", ["resnet18_cifar", "mobilenetv2_cifar"])
def test_gradient_denoising_step_equals_the_one_through_torchs_own_layers(name, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES).train().double()  # float64: see above
    images, labels = batch(16)
    images = images.double()
    state = copy.deepcopy(model.state_dict())
    recorded = []
    for node in (double_backward._TransposableConv2d, double_backward._BatchNorm):
        monkeypatch.setattr(node, "apply", lambda *args, apply=node.apply: recorded.append(1) or apply(*args))
    layers = sum(isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in model.modules())
    ours = parameter_grads(model, GradientDenoising(weight=1.0)(model, images, labels).loss)
    assert len(recorded) == layers  # every convolution and batch norm went through

    model.load_state_dict(state)
    theirs = parameter_grads(model, GradientDenoising(weight=1.0, lean_double_backward=False)(
        model, images, labels).loss)
    assert len(recorded) == layers  # torch's own this time
    ours, theirs = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in theirs])
    assert (ours - theirs).norm() <= 1e-10 * theirs.norm()  # all at once, as above


class Aten:
    """``torch.ops.aten`` as another torch release might have it: the kernel ``name`` missing (``replacement``
    None) or behaving as ``replacement``."""

    def __init__(self, name: str, replacement=None):
        self.name, self.replacement = name, replacement

    def __getattr__(self, attribute):
        if attribute != self.name:
            return getattr(torch.ops.aten, attribute)
        if self.replacement is None:
            raise AttributeError(f"'_OpNamespace' 'aten' object has no attribute '{attribute}'")
        return self.replacement


def swapped_statistics(*args):
    """``_batch_norm_impl_index`` returning the batch mean and 1 / std in each other's place."""
    out, mean, rstd, *rest = torch.ops.aten._batch_norm_impl_index(*args)
    return out, rstd, mean, *rest


def doubled_weight_gradient(*args):
    return tuple(None if g is None else 2 * g for g in torch.ops.aten.convolution_backward(*args))


OTHER_KERNELS = {  # (kernel, how it differs, the layer that must fall back to torch's own)
    "batch-norm backward missing": ("_batch_norm_impl_index_backward", None, "batch norm"),
    "batch-norm statistics swapped": ("_batch_norm_impl_index", swapped_statistics, "batch norm"),
    "convolution weight gradient doubled": ("convolution_backward", doubled_weight_gradient, "convolution"),
}


@pytest.fixture
def fresh_kernel_checks():
    """The private kernels checked afresh in the test, and again after it."""
    double_backward._private_kernels_work.cache_clear()
    yield
    double_backward._private_kernels_work.cache_clear()


@pytest.mark.parametrize("case", OTHER_KERNELS)
def test_missing_or_changed_private_kernels_fall_back_to_torchs_layers_with_a_notice(case, monkeypatch,
                                                                                    fresh_kernel_checks):
    kernel, replacement, layer = OTHER_KERNELS[case]
    monkeypatch.setattr(double_backward, "_aten", Aten(kernel, replacement))
    nodes = {"convolution": double_backward._TransposableConv2d, "batch norm": double_backward._BatchNorm}
    used = {name: [] for name in nodes}
    for name, node in nodes.items():
        monkeypatch.setattr(node, "apply", lambda *args, calls=used[name], apply=node.apply: calls.append(1) or apply(
            *args))
    torch.manual_seed(0)
    model = TinyNet().train().double()  # float64: see above
    images, labels = batch()
    images = images.double()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning) as warned:
        ours = GradientDenoising(weight=1.0)(model, images, labels)
        GradientDenoising(weight=1.0)(model, images, labels)  # checked once: no second notice
    notices = [str(w.message) for w in warned if "gradient denoising differentiates" in str(w.message)]
    assert len(notices) == 1 and "\n" not in notices[0], notices
    assert kernel in notices[0] and f"torch's own {layer} layers" in notices[0]
    assert not used[layer] and all(calls for name, calls in used.items() if name != layer)  # only that layer
    ours_grads = parameter_grads(model, ours.loss)

    model.load_state_dict(state)
    theirs = GradientDenoising(weight=1.0, lean_double_backward=False)(model, images, labels)
    theirs_grads = parameter_grads(model, theirs.loss)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-12)
    ours_grads, theirs_grads = (torch.cat([g.flatten() for g in grads]) for grads in (ours_grads, theirs_grads))
    assert (ours_grads - theirs_grads).norm() <= 1e-10 * theirs_grads.norm()


def test_error_functions_by_hand():
    delta = torch.tensor([[3.0, -4.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2).requires_grad_(True)
    teacher = torch.tensor([[1.0, 0.0, -2.0, 1.0], [1.0, -1.0, 2.0, 0.0]]).view(2, 1, 2, 2)
    # sample 0: difference [2, -4, 2, 0]; <δ, δ'> = 4, ‖δ‖ = √26, ‖δ'‖ = √6; Σ min|.| = 2, ‖δ‖_1 = 8, ‖δ'‖_1 = 4
    # sample 1: δ = 0, difference [-1, 1, -2, 0]; the similarities are 0 by convention
    expected = {"mae": [8 / 4, 4 / 4], "mse": [24 / 4, 6 / 4], "cosine": [-4 / 156 ** 0.5, 0.0],
                "histogram": [-2 / 32, 0.0]}
    functions = {"mae": mean_absolute_error, "mse": mean_squared_error, "cosine": cosine_error,
                 "histogram": histogram_intersection_error}
    assert ERRORS == functions
    for name, function in functions.items():
        error = function(delta, teacher)
        torch.testing.assert_close(error, torch.tensor(expected[name]), msg=name)
        (grad,) = torch.autograd.grad(error.sum(), delta)
        assert torch.isfinite(grad).all(), name
    # the similarities are largest (most negative error) for identical gradients, cosine -1 at any scale
    torch.testing.assert_close(cosine_error(2 * teacher, teacher), torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(histogram_intersection_error(teacher, teacher), torch.tensor([-1 / 4, -1 / 4]))


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_regulariser_gradient_passes_gradcheck(error):
    model = TinyNet("module", batchnorm=False).double()
    images, labels = batch(5, count=3)
    images = images.double()
    names = [name for name, _ in model.named_parameters()]
    teacher = input_gradients(model, images, labels).guided  # a constant, as the teacher is detached

    def regulariser(*params):
        network = lambda x: functional_call(model, dict(zip(names, params, strict=True)), (x,))  # noqa: E731
        return ERRORS[error](input_gradients(network, images, labels).standard, teacher).mean()

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(regulariser, params, eps=1e-6, atol=1e-5)


def parameter_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_zero_weight_is_the_plain_training_step(monkeypatch):
    model = TinyNet().train()
    images, labels = batch()
    state = copy.deepcopy(model.state_dict())  # batch norm's running statistics move with each forward
    plain = parameter_grads(model, classification_loss(model(images), labels))
    model.load_state_dict(state)
    regularised = parameter_grads(model, GradientDenoising(weight=0.0).regularised(model, images, labels).loss)
    for ours, expected in zip(regularised, plain, strict=True):
        torch.testing.assert_close(ours, expected)

    model.load_state_dict(state)
    monkeypatch.setattr("zoo.training.gradient_denoising.input_gradients", None)  # the extra passes are skipped
    step = GradientDenoising(weight=0.0)(model, images, labels)
    assert list(step.terms) == ["classification"]
    for ours, expected in zip(parameter_grads(model, step.loss), plain, strict=True):
        assert torch.equal(ours, expected)


def test_objective_is_classification_plus_weighted_regulariser():
    model, (images, labels) = TinyNet().eval(), batch()
    step = GradientDenoising("mse", weight=0.5)(model, images, labels)
    assert set(step.terms) == {"classification", "regulariser"}
    torch.testing.assert_close(step.terms["classification"], classification_loss(model(images), labels))
    gradients = input_gradients(model, images, labels)
    assert gradients.standard.requires_grad and not gradients.guided.requires_grad  # the teacher is detached
    expected = mean_squared_error(gradients.standard, gradients.guided).mean()
    torch.testing.assert_close(step.terms["regulariser"], expected)
    torch.testing.assert_close(step.loss, step.terms["classification"] + 0.5 * step.terms["regulariser"])
    assert step.logits.shape == (4, NUM_CLASSES)


@pytest.mark.parametrize("error", ["cosine", "mse"])
def test_sgd_with_large_weight_reduces_the_regulariser(error):
    model, (images, labels) = TinyNet(batchnorm=False), batch(count=8)
    objective = GradientDenoising(error, weight={"cosine": 10.0, "mse": 1e4}[error])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05 if error == "cosine" else 0.02)
    history = []
    for _ in range(30):
        step = objective(model, images, labels)
        optimiser.zero_grad()
        step.loss.backward()
        optimiser.step()
        history.append(step.terms["regulariser"].item())
    assert history[-1] < history[0] - 0.1 * abs(history[0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown error function 'l1'"):
        GradientDenoising("l1")
    with pytest.raises(ValueError, match="non-negative"):
        GradientDenoising(weight=-1.0)


def no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
               for m in model.modules())


class FailingBackward(nn.Module):
    """The identity, whose first backward pass (the guided one) raises."""

    def forward(self, x):
        def fail(_):
            raise RuntimeError("fails inside the guided backward")
        if x.requires_grad:
            x.register_hook(fail)
        return x


def test_model_left_unmodified_after_an_error_in_the_guided_backward():
    model, (images, labels) = TinyNet().eval(), batch()
    clean_images = images.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(classification_loss(model(clean_images), labels), clean_images)
    failing = nn.Sequential(FailingBackward(), model)
    with pytest.raises(RuntimeError, match="guided backward"):
        input_gradients(failing, images, labels)
    assert not _get_current_function_mode_stack() and no_hooks(failing)
    assert all(type(m) in (TinyNet, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear) for m in model.modules())
    again = images.clone().requires_grad_(True)
    (after,) = torch.autograd.grad(classification_loss(model(again), labels), again)
    assert torch.equal(after, expected)


def test_switch_restored_after_an_error_in_a_guided_backward():
    model, (images, labels) = TinyNet().eval(), batch()
    images.requires_grad_(True)
    (expected,) = torch.autograd.grad(classification_loss(model(images), labels), images)
    with switchable_relu() as switch:
        loss = classification_loss(model(images), labels)
    with pytest.raises(KeyError), switch.switched_on():
        assert switch.on
        raise KeyError("anything")
    assert not switch.on
    assert torch.equal(torch.autograd.grad(loss, images)[0], expected)  # the same graph, standard again


def distributed_worker(rank, store):
    """Rank ``rank`` of 2: its parameter gradients must be the mean of both ranks' unwrapped gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model and data on both ranks, each rank taking its half
        model, (images, labels) = TinyNet(batchnorm=False), batch(count=8)
        halves = list(zip(images.chunk(2), labels.chunk(2), strict=True))
        objective = GradientDenoising()
        expected = [sum(grads) / 2 for grads in zip(
            *(parameter_grads(model, objective(model, *half).loss) for half in halves), strict=True)]
        wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        for _ in range(2):  # the first step of DDP differs from the next ones
            ours = parameter_grads(wrapped, objective(wrapped, *halves[rank]).loss)
            for grad, reference in zip(ours, expected, strict=True):
                torch.testing.assert_close(grad, reference)
        with pytest.raises(ValueError, match="static_graph"):
            objective(nn.parallel.DistributedDataParallel(model, static_graph=True), *halves[rank])
    finally:
        torch.distributed.destroy_process_group()


def test_works_under_distributed_data_parallel(tmp_path):
    torch.multiprocessing.spawn(distributed_worker, args=(str(tmp_path / "store"),), nprocs=2)
