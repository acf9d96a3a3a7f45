"""Interpretability and recognition metrics as functions on tensors (thesis §1.3.3, §2.4; SPEC §5):
faithfulness (AD, AG, AI, ADCC), insertion/deletion curves, localisation (Table 2.6) and recognition."""

from .curves import *  # noqa: F403
from .curves import __all__ as _curves
from .faithfulness import *  # noqa: F403
from .faithfulness import __all__ as _faithfulness
from .localisation import *  # noqa: F403
from .localisation import __all__ as _localisation

__all__ = [*_faithfulness, *_curves, *_localisation]
