"""Guided-backpropagation semantics for any model's ReLU and ReLU6, however the model calls them.

Guided backpropagation (Springenberg et al. 2014) lets a ReLU pass the gradient back only where its
forward input was positive *and* the incoming gradient is positive (for ReLU6 also only below 6).
Inside ``with guided_relu():`` every ReLU and ReLU6 of the forward pass gets that backward: modules
(``nn.ReLU``, ``nn.ReLU6``), functional calls (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``,
``F.hardtanh(x, 0, 6)``) and their in-place forms alike, because the calls are intercepted at the torch
function level rather than hooked on modules. Leaving the block restores the usual behaviour.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["guided_relu"]


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None) -> torch.Tensor:
        passing = x > 0 if upper is None else (x > 0) & (x < upper)
        ctx.save_for_backward(passing)
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (passing,) = ctx.saved_tensors
        return grad.clamp(min=0) * passing, None


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


class _GuidedMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        x, upper, inplace = call
        out = _GuidedReLU.apply(x, upper)
        return x.copy_(out) if inplace else out


@contextmanager
def guided_relu():
    """Every ReLU/ReLU6 run inside the block backpropagates with guided semantics."""
    with _GuidedMode():
        yield
