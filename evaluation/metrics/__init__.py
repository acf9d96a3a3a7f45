"""Interpretability and recognition metrics as functions on tensors (thesis §1.3.3, §2.4; SPEC §5)."""

from .faithfulness import average_drop, average_gain, average_increase

__all__ = ["average_drop", "average_gain", "average_increase"]
