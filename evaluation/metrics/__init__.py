"""Interpretability metrics as functions on tensors (thesis §1.3.3, §2.4): faithfulness (AD, AG, AI), insertion and
deletion, ADCC and localisation (Table 2.6). Importing this package declares them in the registry of ``zoo.metrics``
(which holds the recognition metrics)."""

# the declaration order is the tables' column order: AD AG AI, I D, ADCC; then OM ... SM
# isort: off
from .faithfulness import *  # noqa: F403
from .faithfulness import __all__ as _faithfulness
from .curves import *  # noqa: F403
from .curves import __all__ as _curves
from .adcc import *  # noqa: F403
from .adcc import __all__ as _adcc
from .localisation import *  # noqa: F403
from .localisation import __all__ as _localisation
# isort: on

__all__ = [*_faithfulness, *_curves, *_adcc, *_localisation]
