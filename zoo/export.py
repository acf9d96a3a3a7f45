"""Export a zoo model with its saliency: ``torch.export`` and ONNX graphs with a dynamic batch dimension."""

from pathlib import Path

import torch

__all__ = ["exported_program", "to_onnx"]


def _inputs(model: torch.nn.Module, input_size: tuple[int, int, int]):
    """The example batch (two images) and the dynamic shape that leaves its batch size free."""
    example = torch.randn(2, *input_size, device=next(model.parameters()).device)
    return (example,), ({0: torch.export.Dim("batch", min=1)},)


def exported_program(model: torch.nn.Module,
                     input_size: tuple[int, int, int] = (3, 224, 224)) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode for images of ``input_size`` (C, H, W), at any batch size;
    ``program.module()(x)`` returns what the model returns (a ``ModelOutput`` unless ``return_saliency=False``)."""
    args, dynamic_shapes = _inputs(model.eval(), input_size)
    return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)


def to_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int, int] = (3, 224, 224)) -> Path:
    """Write ``model`` (in eval mode) to the ONNX file ``path``: input ``images`` [batch, C, H, W], outputs
    ``logits`` and ``saliency`` (``logits`` alone with ``return_saliency=False``), any batch size."""
    args, dynamic_shapes = _inputs(model.eval(), input_size)
    with torch.no_grad():
        names = ["logits", "saliency"] if isinstance(model(*args), tuple) else ["logits"]
    torch.onnx.export(model, args, str(path), input_names=["images"], output_names=names,
                      dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    return Path(path)
