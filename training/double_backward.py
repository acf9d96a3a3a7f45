"""2-D convolutions whose input gradient differentiates like an ordinary convolution (thesis §4.2).

Gradient denoising differentiates the input gradient ``δx`` with respect to the parameters, so every
convolution's backward is itself differentiated. torch does that with ``_convolution_double_backward``,
which computes the weight part as forward convolutions of transposed tensors and, for a grouped
convolution, runs one convolution per group (thousands per step for MobileNet-V2's depthwise layers).
Every ``F.conv2d`` of a forward run inside ``with transposable_convolutions() as inputs_only:`` (modules
and functional calls alike, intercepted at the torch function level) is recorded as one node whose input
gradient is ``conv_transpose2d(grad, weight)``: differentiating it is a transposed convolution's ordinary
backward. The values are those of torch's own convolution (up to rounding). Backward passes that only
need input gradients run with the yielded switch on (``with inputs_only.switched_on():``), which skips
the weight and bias gradients, as torch's engine does for its own nodes.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from zoo.guided import BackwardSwitch

__all__ = ["transposable_convolutions"]


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


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _TransposableMode(TorchFunctionMode):
    def __init__(self, inputs_only: BackwardSwitch):
        super().__init__()
        self.inputs_only = inputs_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.conv2d:
            return func(*args, **kwargs)
        call = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                **dict(zip(_CONV2D_ARGS, args, strict=False)), **kwargs}
        if isinstance(call["padding"], str) or call["input"].ndim != 4:  # "same"/"valid", unbatched: torch's own
            return func(*args, **kwargs)
        return _TransposableConv2d.apply(call["input"], call["weight"], call["bias"], _pair(call["stride"]),
                                         _pair(call["padding"]), _pair(call["dilation"]), call["groups"],
                                         self.inputs_only)


@contextmanager
def transposable_convolutions(enabled: bool = True) -> Iterator[BackwardSwitch]:
    """Every 2-D convolution run inside the block is recorded as a ``_TransposableConv2d`` node; only the
    forward needs to run inside it. While the yielded switch is on, their backward gives inputs gradients only.
    ``enabled=False`` leaves torch's own convolutions (the switch then changes nothing)."""
    inputs_only = BackwardSwitch()
    with _TransposableMode(inputs_only) if enabled else nullcontext():
        yield inputs_only
