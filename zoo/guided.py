"""Guided-backpropagation semantics for any model's ReLU and ReLU6, however the model calls them.

Guided backpropagation (Springenberg et al. 2014) lets a ReLU pass the gradient back only where its
forward input was positive *and* the incoming gradient is positive (for ReLU6 also only below 6).
Every ReLU and ReLU6 of a forward pass run inside ``with switchable_relu() as switch:`` is recorded as
one autograd node that holds ``switch``: by default it backpropagates exactly as torch's own ReLU/ReLU6
(differentiably, so ``create_graph=True`` and double backward work); inside
``with switch.switched_on():`` it backpropagates guided. So one forward serves both gradients, which
is what gradient denoising (thesis ch. 4) needs. ``with guided_relu():`` is the same with the switch set
to guided for good. Modules (``nn.ReLU``, ``nn.ReLU6``), functional calls (``F.relu``, ``torch.relu``,
``x.relu()``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``) and their in-place forms are all caught, because the
calls are intercepted at the torch function level: no hook is registered and no module is changed.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["BackwardSwitch", "guided_relu", "switchable_relu"]


class BackwardSwitch:
    """A flag that recorded autograd nodes read when their backward runs (for the ReLUs of ``switchable_relu``:
    guided while ``on``). That may be in another thread (the autograd engine's, on CUDA); hence an object
    shared by reference rather than a thread-local flag.
    """

    def __init__(self, on: bool = False):
        self.on = on

    @contextmanager
    def switched_on(self) -> Iterator[None]:
        """Backward passes run inside the block see the switch on; it is restored on leaving, even on error."""
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous


class _SwitchableReLU(torch.autograd.Function):
    """ReLU (``upper`` None) or ReLU6 (``upper`` 6) whose backward follows ``switch``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None, switch: BackwardSwitch) -> torch.Tensor:
        out = x.clamp(0, upper)
        ctx.save_for_backward(out)  # 0 < out < upper exactly where 0 < x < upper
        ctx.upper, ctx.switch = upper, switch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # the mask is piecewise constant: detached, differentiating this backward (create_graph=True) costs one
        # pass over grad, without the zero derivative with respect to the forward's output that torch would add
        out = ctx.saved_tensors[0].detach()
        # the very ops of torch's own ReLU / ReLU6 derivatives, differentiable in grad
        if ctx.upper is None:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        else:
            grad = torch.ops.aten.hardtanh_backward(grad, out, 0, ctx.upper)
        if ctx.switch.on:  # guided: masking then keeping the positive part is keeping the positive part masked
            grad.clamp_(min=0)
        return grad, None, None


# function -> (upper bound or None, whether it works in place)
_RELUS = {
    torch.relu: (None, False), torch.Tensor.relu: (None, False), F.relu: (None, None),
    torch.relu_: (None, True), torch.Tensor.relu_: (None, True), F.relu_: (None, True),
    F.relu6: (6.0, None),
}


def _call(func, args, kwargs):
    """(input, upper bound, in place) when ``func(*args, **kwargs)`` is a ReLU or ReLU6, else None."""
    if func is F.hardtanh:  # nn.ReLU6 is hardtanh(x, 0, 6)
        params = {"min_val": -1.0, "max_val": 1.0, "inplace": False,
                  **dict(zip(("min_val", "max_val", "inplace"), args[1:], strict=False)), **kwargs}
        if (params["min_val"], params["max_val"]) != (0.0, 6.0):
            return None
        return args[0], 6.0, params["inplace"]
    if func not in _RELUS:
        return None
    upper, inplace = _RELUS[func]
    if inplace is None:  # F.relu and F.relu6 take the flag as an argument
        inplace = {"inplace": False, **dict(zip(("inplace",), args[1:], strict=False)), **kwargs}["inplace"]
    return args[0], upper, inplace


class _SwitchableMode(TorchFunctionMode):
    def __init__(self, switch: BackwardSwitch):
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        x, upper, inplace = call
        out = _SwitchableReLU.apply(x, upper, self.switch)
        return x.copy_(out) if inplace else out


@contextmanager
def switchable_relu(guided: bool = False) -> Iterator[BackwardSwitch]:
    """Every ReLU/ReLU6 run inside the block backpropagates as the yielded switch says when backward runs.

    Only the forward needs to run inside the block; the backward passes may run after it.
    """
    switch = BackwardSwitch(guided)
    with _SwitchableMode(switch):
        yield switch


@contextmanager
def guided_relu() -> Iterator[None]:
    """Every ReLU/ReLU6 run inside the block backpropagates with guided semantics."""
    with switchable_relu(guided=True):
        yield
