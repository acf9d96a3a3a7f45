"""Scripts outside the package (examples/, benchmarks/, experiments/) as ``python <folder>/<script>.py`` runs
them: their own folder first on ``sys.path``, so that they import their neighbours (``benchmarks/measure.py``)."""

import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def _beside(path: Path):
    sys.path.insert(0, str(path.parent))
    try:
        yield
    finally:
        sys.path.remove(str(path.parent))


def load_script(relative: str) -> dict:
    """The script's globals, its ``if __name__ == "__main__"`` part not run."""
    path = ROOT / relative
    with _beside(path):
        return runpy.run_path(str(path))


def run_script(relative: str, argv: list[str]) -> dict:
    """Run the script as ``python <relative> <argv>`` would."""
    path = ROOT / relative
    with _beside(path):
        old, sys.argv = sys.argv, [str(path), *argv]
        try:
            return runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = old
