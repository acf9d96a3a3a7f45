"""The output contract shared by every zoo model, and the input checks they (and ``explain``) make."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch

__all__ = ["ModelOutput", "check_image_batch", "checked_inputs", "logits_of", "model_name"]


NOT_A_TENSOR = ("a zoo ModelOutput (logits, saliency), not a tensor: read its .logits, or create the model "
                "with return_saliency=False for plain logits (timm's train.py, validate.py and inference.py: "
                "--model-kwargs return_saliency=False)")


def _operator(symbol: str, tuple_operator=None, tuple_operand: type | tuple = ()):
    """A ``ModelOutput`` operator: the tuple's own for a ``tuple_operand`` (``+`` or a comparison with a tuple,
    ``*`` with an int), else the TypeError that says how to get the logits."""

    def operator(self, *operands):
        if operands and isinstance(operands[0], tuple_operand):
            return tuple_operator(self, *operands)
        raise TypeError(f"the {symbol} operator got {NOT_A_TENSOR}")

    return operator


class ModelOutput(NamedTuple):
    """What a zoo model's forward returns: logits and its built-in saliency, from one pass.

    ``logits`` is ``[B, num_classes]``; ``saliency`` is ``[B, h, w]`` at the resolution of the
    feature map it comes from (upsample it to the image to overlay it). It is not a tensor: a torch function
    or tensor operator given it, or a tensor attribute asked of it, raises an error that says to read
    ``.logits`` or to create the model with ``return_saliency=False``.
    """

    logits: torch.Tensor
    saliency: torch.Tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{getattr(func, '__name__', func)} got {NOT_A_TENSOR}")

    def __getattr__(self, name: str):
        hint = f": it is {NOT_A_TENSOR}" if hasattr(torch.Tensor, name) and not name.startswith("__") else ""
        raise AttributeError(f"'ModelOutput' object has no attribute {name!r}{hint}", name=name, obj=self)

    __add__ = _operator("+", tuple.__add__, tuple)
    __mul__ = __rmul__ = _operator("*", tuple.__mul__, int)
    __lt__ = _operator("<", tuple.__lt__, tuple)
    __le__ = _operator("<=", tuple.__le__, tuple)
    __gt__ = _operator(">", tuple.__gt__, tuple)
    __ge__ = _operator(">=", tuple.__ge__, tuple)
    __radd__ = _operator("+")
    __sub__ = __rsub__ = _operator("-")
    __truediv__ = __rtruediv__ = _operator("/")
    __floordiv__ = __rfloordiv__ = _operator("//")
    __mod__ = __rmod__ = _operator("%")
    __pow__ = __rpow__ = _operator("**")
    __matmul__ = __rmatmul__ = _operator("@")
    __neg__ = _operator("unary -")


def logits_of(output) -> torch.Tensor:
    """The logits of any classifier's output: a zoo ``ModelOutput``, a tuple whose first item they are, or the
    plain tensor of a timm or torchvision model."""
    return output[0] if isinstance(output, tuple) else output


def model_name(model: torch.nn.Module) -> str:
    """The name a model goes by in error messages: its timm architecture, else its class's name."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


_INPUTS_CHECKED = ContextVar("inputs_checked", default=False)


@contextmanager
def checked_inputs() -> Iterator[None]:
    """Within it, ``check_image_batch`` leaves out its finiteness check (a host synchronisation per forward on a
    GPU): for callers that checked their images once and then run the model many times on images derived from them
    (a saliency method's masked or perturbed copies, the harness's curves)."""
    token = _INPUTS_CHECKED.set(True)
    try:
        yield
    finally:
        _INPUTS_CHECKED.reset(token)


def check_image_batch(x: torch.Tensor, in_chans: int, name: str, min_size: int | None = None) -> None:
    """Raise an error that names the problem unless ``x`` is a finite floating-point image batch [B, in_chans, H, W]
    (a TypeError for anything but a tensor, a ValueError otherwise), at least ``min_size`` pixels high and wide
    when given: the stride of the model's last stage. Finiteness, which depends on the data, is not checked on the meta
    device, nor while ``torch.compile`` or ``torch.export`` trace the model, nor within ``checked_inputs()``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} expects an image batch [B, C, H, W], got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point image batch, got {x.dtype} (8-bit pixels? convert them "
                         "with x.float() / 255, then normalise with the model's mean and std)")
    height, width = x.shape[-2:]
    if min_size is not None and min(height, width) < min_size:
        raise ValueError(
            f"input {height}x{width} is too small for {name}: its last stage has stride {min_size}, "
            f"so height and width must be at least {min_size}"
        )
    if x.is_meta or torch.compiler.is_compiling() or _INPUTS_CHECKED.get():
        return  # no values to check; a data-dependent branch breaks the graph; checked by the caller
    finite = x.flatten(1).isfinite().all(1)
    if not finite.all():
        positions = ", ".join(map(str, finite.logical_not().nonzero().flatten().tolist()))
        raise ValueError(f"images for {name} are not finite (NaN or Inf) at batch positions {positions}")
