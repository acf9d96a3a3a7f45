"""Interpretability metrics as functions on tensors (thesis §1.3.3, §2.4): faithfulness (AD, AG, AI), insertion and
deletion, ADCC and localisation (Table 2.6). Importing this package declares them in the registry of ``zoo.metrics``
(which holds the recognition metrics)."""

# the declaration order is the tables' column order: AD AG AI, I D, ADCC; then OM ... SM
# isort: off
from .inputs import *  # noqa: F403
from .inputs import __all__ as _inputs
from .faithfulness import *  # noqa: F403
from .faithfulness import __all__ as _faithfulness
from .curves import *  # noqa: F403
from .curves import __all__ as _curves
from .adcc import *  # noqa: F403
from .adcc import __all__ as _adcc
from .road import *  # noqa: F403
from .road import __all__ as _road
from .localisation import *  # noqa: F403
from .localisation import __all__ as _localisation
from .grid import *  # noqa: F403
from .grid import __all__ as _grid
from .sanity import *  # noqa: F403
from .sanity import __all__ as _sanity
# isort: on

__all__ = [*_inputs, *_faithfulness, *_curves, *_adcc, *_road, *_localisation, *_grid, *_sanity]
