"""Layers whose backward differentiates cheaply, for gradient denoising (thesis §4.2).

Gradient denoising differentiates the input gradient ``δx`` with respect to the parameters, so the backward
of every layer is itself differentiated. Inside ``with lean_double_backward() as inputs_only:`` every
``F.conv2d`` and every training-mode ``F.batch_norm`` of a forward (modules and functional calls alike,
intercepted at the torch function level) is recorded as a node of our own, with torch's values (up to
rounding) and a cheaper second derivative:

- A convolution's input gradient is ``conv_transpose2d(grad, weight)``, so differentiating it is a
  transposed convolution's ordinary backward. torch's ``_convolution_double_backward`` computes the weight
  part as forward convolutions of transposed tensors and, for a grouped convolution, runs one convolution
  per group (thousands per step for MobileNet-V2's depthwise layers).
- Batch norm runs the kernels torch would pick (cuDNN's on a GPU) for its forward and gradients; their
  derivative is written out per channel and compiled by ``torch.compile`` (a C++ kernel on the CPU, Triton
  on a GPU) into one pass of channel sums and one element-wise pass, where torch's generic
  ``batchnorm_double_backward`` runs about sixty operations over the activations. Without a C++ compiler,
  ``TORCHDYNAMO_DISABLE=1`` runs the same derivative in eager torch.

Backward passes that only need input gradients run with the yielded switch on
(``with inputs_only.switched_on():``), which skips the weight and bias gradients, as torch's engine does
for its own nodes.

The nodes call kernels that torch does not publish (``_aten`` below). Before the first use of each layer's node,
a check on a tiny float64 input on the CPU runs them against torch's own layer; where they are missing or
give other values (another torch release), that layer stays torch's own, with a one-line warning, and gradient
denoising is only slower.
"""

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from zoo.guided import BackwardSwitch

__all__ = ["lean_double_backward"]

_aten = torch.ops.aten  # _batch_norm_impl_index, _batch_norm_impl_index_backward, convolution_backward


def _convolution_weight_gradient(grad, x, weight, stride, padding, dilation, groups):
    """The weight gradient of ``F.conv2d`` alone, by torch's kernel."""
    return _aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                      [False, True, False])[1]


def _batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """(output, batch mean, 1 / batch std, kernel's reserve, kernel) of training-mode batch norm, by the kernel
    torch picks (cuDNN's where torch would use it); the running statistics updated as torch does."""
    return _aten._batch_norm_impl_index(x, weight, bias, running_mean, running_var, True, momentum, eps,
                                        torch.backends.cudnn.enabled)


class _TransposableConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, inputs_only):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.inputs_only = (stride, padding, dilation, groups), inputs_only
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        # under autocast the forward ran in the output's precision, not the inputs': so does the backward
        low_weight = weight.to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the rows and columns of x that the strided convolution never reached
            output_padding = [x.shape[i] - ((grad.shape[i] - 1) * stride[i - 2] - 2 * padding[i - 2]
                                            + dilation[i - 2] * (weight.shape[i] - 1) + 1) for i in (2, 3)]
            grad_x = F.conv_transpose2d(grad, low_weight, None, stride, padding, output_padding, groups,
                                        dilation).to(x.dtype)
        if not ctx.inputs_only.on:
            if ctx.needs_input_grad[1]:
                grad_weight = _convolution_weight_gradient(grad, x.to(grad.dtype), low_weight, stride, padding,
                                                           dilation, groups).to(weight.dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch norm through torch's own kernel choice (cuDNN where torch would use it), with batch
    statistics, running statistics updated as torch does."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, inputs_only):
        out, mean, rstd, reserve, kernel = _batch_norm_forward(x, weight, bias, running_mean, running_var, momentum,
                                                               eps)
        ctx.save_for_backward(x, weight, mean, rstd, reserve)
        ctx.eps, ctx.kernel, ctx.inputs_only = eps, kernel, inputs_only
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd, reserve = ctx.saved_tensors
        parameters = not ctx.inputs_only.on
        mask = [ctx.needs_input_grad[0], parameters and ctx.needs_input_grad[1],
                parameters and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():  # create_graph: the gradients as a node that will be differentiated
            grads = _BatchNormGradient.apply(grad, x, weight, mean, rstd, reserve, ctx.kernel, ctx.eps, mask)
        else:
            grads = _batch_norm_gradients(ctx.kernel, grad, x, weight, mean, rstd, reserve, ctx.eps, mask)
        return *(g if needed else None for g, needed in zip(grads, mask, strict=True)), None, None, None, None, None


def _batch_norm_gradients(kernel, grad, x, weight, mean, rstd, reserve, eps, mask):
    """(dx, dγ, dβ) by the backward of the kernel ``_batch_norm_impl_index`` chose; cuDNN's computes all three
    whatever ``mask`` says, and needs ``grad`` in the layout of ``x``."""
    if grad.stride() != x.stride():
        grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)
    return _aten._batch_norm_impl_index_backward(kernel, x, grad, weight, None, None, mean, rstd, True, eps, mask,
                                                 reserve)


class _BatchNormGradient(torch.autograd.Function):
    """(dx, dγ, dβ) of training-mode batch norm from the output gradient g; its backward is written out."""

    @staticmethod
    def forward(ctx, grad, x, weight, mean, rstd, reserve, kernel, eps, mask):
        # dγ and dβ are sums over g that the kernel computes for dx anyway: kept, they save the backward two passes
        grad_x, grad_weight, grad_bias = _batch_norm_gradients(kernel, grad, x, weight, mean, rstd, reserve, eps,
                                                               [mask[0], True, True])
        count = x.numel() // x.shape[1]  # values per channel
        ctx.save_for_backward(grad, x, weight, mean, rstd, grad_bias / count, grad_weight / count)
        ctx.set_materialize_grads(False)  # an output nobody used gets None, and costs nothing
        return grad_x, grad_weight if mask[1] else None, grad_bias if mask[2] else None

    @staticmethod
    @once_differentiable
    def backward(ctx, v, v_weight, v_bias):
        grad, x, weight, mean, rstd, g_mean, g_xhat = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, as torch's own
        channel = torch.zeros_like(mean, dtype=dtype)
        grad_g, grad_x, grad_weight = _compiled_second_derivative(
            torch.zeros_like(x, dtype=dtype) if v is None else v.to(dtype),  # None only when dx was not used
            channel if v_weight is None else v_weight.to(dtype), channel if v_bias is None else v_bias.to(dtype),
            grad.to(dtype), x.to(dtype), weight.detach().to(dtype), mean, rstd, g_mean.to(dtype), g_xhat.to(dtype))
        return (grad_g.to(grad.dtype), grad_x.to(x.dtype), None if v is None else grad_weight.to(weight.dtype),
                None, None, None, None, None, None)


def batch_norm_second_derivative(v, v_weight, v_bias, g, x, gamma, mean, rstd, g_mean, g_xhat):
    """The derivatives of (dx, dγ, dβ) of training-mode batch norm along (v, v_weight, v_bias), with respect to
    the output gradient g, to x and to γ; ``g_mean`` and ``g_xhat`` are the channel means of g and g·x̂.

    Per channel, with c = x - μ, r = 1/σ and x̂ = r·c: dx = γ·r·(g - mean g - x̂·mean(g·x̂)), dγ = Σ g·x̂,
    dβ = Σ g. The derivatives with respect to g and x are per-channel combinations of v, g and c:
    grad_g = γr·v + k·c + g_0 and grad_x = x_v·v + k·g + x_c·c + x_0 (the mixed coefficient k is shared, the
    second derivative being symmetric). Compiled, three channel means and one element-wise pass."""
    spatial, shape = list(range(2, x.ndim)), [1, -1] + [1] * (x.ndim - 2)

    def channel_mean(t):  # spatial positions first: faster kernels than one reduction over both, either layout
        return (t.mean(spatial, True) if spatial else t).mean(0, True)

    r, c = rstd.view(shape), x - mean.view(shape)
    gamma_r, v_weight_r = gamma.view(shape) * r, v_weight.view(shape) * r
    g_mean, g_xhat = g_mean.view(shape), g_xhat.view(shape)
    v_mean, v_xhat, v_g = channel_mean(v), channel_mean(v * c) * r, channel_mean(v * g)
    v_h = v_g - v_mean * g_mean - v_xhat * g_xhat  # mean(v·dx) / (γ·r)
    k = v_weight_r - gamma_r * r * v_xhat
    g_0 = v_bias.view(shape) - gamma_r * v_mean
    x_c = -gamma_r * r * r * (v_h - 2 * v_xhat * g_xhat) - v_weight_r * r * g_xhat
    x_0 = gamma_r * r * (g_xhat * v_mean + v_xhat * g_mean) - v_weight_r * g_mean
    grad_g = gamma_r * v + k * c + g_0
    grad_x = x_c * c + x_0 + k * g - gamma_r * r * g_xhat * v
    return grad_g, grad_x, (r * v_h).flatten() * (x.numel() // x.shape[1])


# one graph for every shape; weight.detach() above keeps nn.Parameter's static shapes out of it
_compiled_second_derivative = torch.compile(batch_norm_second_derivative, dynamic=True)


def _tiny_inputs(*shapes):
    """float64 CPU tensors of ``shapes``, drawn from a generator of their own (the global RNG left alone)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _convolution_problem() -> str | None:
    """What differs between the weight gradient of ``_convolution_weight_gradient`` and torch's own."""
    x, weight, grad = _tiny_inputs((2, 4, 7, 7), (6, 2, 3, 3), (2, 6, 4, 4))
    ours = _convolution_weight_gradient(grad, x, weight, (2, 2), (1, 1), (1, 1), 2)
    weight.requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.conv2d(x, weight, None, 2, 1, 1, 2), weight, grad)
    return None if ours.shape == theirs.shape and torch.allclose(ours, theirs) else "another weight gradient"


def _batch_norm_problem() -> str | None:
    """What differs between ``_batch_norm_forward``/``_batch_norm_gradients`` and torch's own batch norm: output,
    running statistics, gradients, and the batch statistics that ``batch_norm_second_derivative`` takes."""
    x, weight, bias, grad = _tiny_inputs((4, 3, 5, 5), (3,), (3,), (4, 3, 5, 5))
    statistics = [torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)]  # running mean and variance
    torchs_statistics = [t.clone() for t in statistics]
    out, mean, rstd, reserve, kernel = _batch_norm_forward(x, weight, bias, *statistics, 0.1, 1e-5)
    ours = _batch_norm_gradients(kernel, grad, x, weight, mean, rstd, reserve, 1e-5, [True, True, True])
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    expected = F.batch_norm(inputs[0], *torchs_statistics, inputs[1], inputs[2], True, 0.1, 1e-5)
    compared = {"output": (out, expected), "running statistics": (statistics, torchs_statistics),
                "batch mean": (mean, x.mean((0, 2, 3))),
                "1 / batch std": (rstd, (x.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()),
                "gradients": (ours, torch.autograd.grad(expected, inputs, grad))}
    for name, (a, b) in compared.items():
        pairs = zip(a, b, strict=True) if isinstance(a, list | tuple) else [(a, b)]
        if not all(u.shape == v.shape and torch.allclose(u, v.detach()) for u, v in pairs):
            return f"another {name}"
    return None


_CHECKS = {"convolution": (_convolution_problem, "convolution_backward"),
           "batch norm": (_batch_norm_problem, "_batch_norm_impl_index and _batch_norm_impl_index_backward")}


@functools.cache
def _private_kernels_work(layer: str) -> bool:
    """Whether the node of ``layer`` (a key of ``_CHECKS``) can be used: its private kernels exist and give torch's
    own values on a tiny input. Checked once; when not, a one-line warning says torch's own layer is used."""
    check, kernels = _CHECKS[layer]
    try:
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            problem = check()
    except Exception as error:  # missing (AttributeError) or called otherwise (TypeError, RuntimeError)
        problem = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    if problem:
        warnings.warn(f"torch {torch.__version__}'s private {kernels} ({problem}): gradient denoising "
                      f"differentiates torch's own {layer} layers instead, with the same result, more slowly",
                      RuntimeWarning, stacklevel=2)
    return problem is None


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class _LeanMode(TorchFunctionMode):
    def __init__(self, inputs_only: BackwardSwitch):
        super().__init__()
        self.inputs_only = inputs_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                    **dict(zip(_CONV2D_ARGS, args, strict=False)), **kwargs}
            if (not isinstance(call["padding"], str) and call["input"].ndim == 4  # not "same"/"valid", batched
                    and _private_kernels_work("convolution")):
                return _TransposableConv2d.apply(call["input"], call["weight"], call["bias"], _pair(call["stride"]),
                                                 _pair(call["padding"]), _pair(call["dilation"]), call["groups"],
                                                 self.inputs_only)
        if func is F.batch_norm:
            call = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                    **dict(zip(_BATCH_NORM_ARGS, args, strict=False)), **kwargs}
            if (call["training"] and call["weight"] is not None and call["bias"] is not None
                    and _private_kernels_work("batch norm")):
                F._verify_batch_size(call["input"].size())
                return _BatchNorm.apply(call["input"], call["weight"], call["bias"], call["running_mean"],
                                        call["running_var"], call["momentum"], call["eps"], self.inputs_only)
        return func(*args, **kwargs)


@contextmanager
def lean_double_backward(enabled: bool = True) -> Iterator[BackwardSwitch]:
    """Every 2-D convolution and training-mode affine batch norm run inside the block is recorded as a node of
    ours (only the forward needs to run inside it). While the yielded switch is on, their backward gives input
    gradients only. ``enabled=False`` leaves torch's own layers (the switch then changes nothing)."""
    inputs_only = BackwardSwitch()
    with _LeanMode(inputs_only) if enabled else nullcontext():
        yield inputs_only
