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
- Batch norm's gradients keep torch's fused kernel; their derivative is written out per channel: three
  channel means and a few multiply-adds over the activations, where torch's generic
  ``batchnorm_double_backward`` runs about sixty operations over them.

Backward passes that only need input gradients run with the yielded switch on
(``with inputs_only.switched_on():``), which skips the weight and bias gradients, as torch's engine does
for its own nodes.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from zoo.guided import BackwardSwitch

__all__ = ["lean_double_backward"]


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
        low_x, low_weight = x.to(grad.dtype), weight.to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the rows and columns of x that the strided convolution never reached
            output_padding = [x.shape[i] - ((grad.shape[i] - 1) * stride[i - 2] - 2 * padding[i - 2]
                                            + dilation[i - 2] * (weight.shape[i] - 1) + 1) for i in (2, 3)]
            grad_x = F.conv_transpose2d(grad, low_weight, None, stride, padding, output_padding, groups,
                                        dilation).to(x.dtype)
        if not ctx.inputs_only.on:
            if ctx.needs_input_grad[1]:
                grad_weight = torch.ops.aten.convolution_backward(grad, low_x, low_weight, None, stride, padding,
                                                                  dilation, False, [0, 0], groups,
                                                                  [False, True, False])[1].to(weight.dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch norm (batch statistics, running statistics updated as torch does)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, inputs_only):
        out, mean, rstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps, ctx.inputs_only = eps, inputs_only
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        parameters = not ctx.inputs_only.on
        mask = [ctx.needs_input_grad[0], parameters and ctx.needs_input_grad[1],
                parameters and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():  # create_graph: the gradients as a node that will be differentiated
            grads = _BatchNormGradient.apply(grad, x, weight, mean, rstd, ctx.eps, mask)
        else:
            grads = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, rstd, True, ctx.eps,
                                                              mask)
        return *grads, None, None, None, None, None


class _BatchNormGradient(torch.autograd.Function):
    """(dx, dγ, dβ) of training-mode batch norm from the output gradient g; its backward is written out."""

    @staticmethod
    def forward(ctx, grad, x, weight, mean, rstd, eps, mask):
        # dγ and dβ are sums over g that the kernel computes for dx anyway: kept, they save the backward two passes
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, rstd, True, eps, [mask[0], True, True])
        ctx.count = x.numel() // x.shape[1]  # values per channel
        ctx.save_for_backward(grad, x, weight, mean, rstd, grad_bias / ctx.count, grad_weight / ctx.count)
        ctx.set_materialize_grads(False)  # an output nobody used gets None, and costs nothing
        return grad_x, grad_weight if mask[1] else None, grad_bias if mask[2] else None

    @staticmethod
    @once_differentiable
    def backward(ctx, v, v_weight, v_bias):
        # Per channel, with c = x - μ, r = 1/σ and x̂ = r·c: dx = γ·r·(g - mean g - x̂·mean(g·x̂)), dγ = Σ g·x̂,
        # dβ = Σ g. Their derivatives along (v, v_weight, v_bias) with respect to g, x and γ are per-channel
        # combinations of v, g and c: grad_g = g_v·v + g_c·c + g_0 and grad_x = x_v·v + x_g·g + x_c·c + x_0.
        grad, x, weight, mean, rstd, g_mean, g_xhat = ctx.saved_tensors
        dims, shape = [0, *range(2, x.ndim)], [1, -1] + [1] * (x.ndim - 2)
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, as torch's own

        def channel_mean(t):
            return t.mean(dims, keepdim=True)

        g, c = grad.to(dtype), x.to(dtype) - mean.view(shape)
        r, gamma = rstd.view(shape), weight.to(dtype).view(shape)
        g_mean, g_xhat = g_mean.to(dtype).view(shape), g_xhat.to(dtype).view(shape)  # mean g, mean(g·x̂)
        g_c = g_0 = x_g = x_c = x_0 = torch.zeros_like(r)
        grad_weight = None
        if v is not None:
            v = v.to(dtype)
            v_mean, v_xhat = channel_mean(v), r * channel_mean(v * c)
            v_h = channel_mean(v * g) - v_mean * g_mean - v_xhat * g_xhat  # mean(v·dx) / (γ·r)
            g_v, g_c, g_0 = gamma * r, -gamma * r * r * v_xhat, -gamma * r * v_mean
            x_v, x_g = -gamma * r * r * g_xhat, -gamma * r * r * v_xhat
            x_c = -gamma * r ** 3 * (v_h - 2 * v_xhat * g_xhat)
            x_0 = gamma * r * r * (g_xhat * v_mean + v_xhat * g_mean)
            grad_weight = (r * v_h).flatten() * ctx.count
        if v_weight is not None:
            v_weight = v_weight.to(dtype).view(shape)
            g_c = g_c + v_weight * r
            x_g, x_c, x_0 = x_g + v_weight * r, x_c - v_weight * r * r * g_xhat, x_0 - v_weight * r * g_mean
        if v_bias is not None:
            g_0 = g_0 + v_bias.to(dtype).view(shape)
        grad_g = torch.addcmul(g_0, c, g_c)
        grad_x = torch.addcmul(x_0, c, x_c).addcmul_(g, x_g)
        if v is not None:
            grad_g.addcmul_(v, g_v)
            grad_x.addcmul_(v, x_v)
        return (grad_g.to(grad.dtype), grad_x.to(x.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None)


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
            if not isinstance(call["padding"], str) and call["input"].ndim == 4:  # not "same"/"valid", batched
                return _TransposableConv2d.apply(call["input"], call["weight"], call["bias"], _pair(call["stride"]),
                                                 _pair(call["padding"]), _pair(call["dilation"]), call["groups"],
                                                 self.inputs_only)
        if func is F.batch_norm:
            call = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                    **dict(zip(_BATCH_NORM_ARGS, args, strict=False)), **kwargs}
            if call["training"] and call["weight"] is not None and call["bias"] is not None:
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
