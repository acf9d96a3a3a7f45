"""The metrics' input checks: each refuses its tensors with a ValueError that names the tensor and the problem."""

import torch


def check_finite(layout: str, ndim: int | None = None, **named: torch.Tensor) -> torch.Size:
    """Refuse the tensors unless each is a non-empty float tensor (with ``ndim`` dimensions, as ``layout`` says),
    finite, and all share one shape; returns that shape."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or ndim not in (None, t.ndim):
            got = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float tensor {layout}, got {got}")
    shapes = {name: list(t.shape) for name, t in named.items()}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    for name, t in named.items():
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {list(t.shape)}): there is nothing to measure")
        if not t.isfinite().all():
            raise ValueError(f"{name} holds NaN or Inf at {int((~t.isfinite()).sum())} of {t.numel()} entries")
    return next(iter(named.values())).shape


def check_unit_interval(**named: torch.Tensor) -> None:
    """Refuse the tensors unless each lies in [0, 1]."""
    for name, t in named.items():
        if t.min() < 0 or t.max() > 1:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{t.min().item():.4g}, {t.max().item():.4g}]")


def check_fractions(**named: torch.Tensor) -> None:
    """Refuse the tensors unless they share one shape, are float, finite and in [0, 1]."""
    check_finite("of values in [0, 1]", **named)
    check_unit_interval(**named)


def check_maps(**named: torch.Tensor) -> tuple[int, int, int]:
    """Refuse the tensors unless they are finite float maps [N, H, W] of one shape; returns (N, H, W)."""
    return check_finite("of maps [N, H, W]", 3, **named)
