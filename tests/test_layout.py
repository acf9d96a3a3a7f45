"""The architecture as the imports show it: one package ``zoo`` whose layers only point down,

    zoo (models, data, hub, metrics)  <-  zoo.training, zoo.evaluation  <-  zoo.app, examples/, benchmarks/,
                                                                             experiments/

and a library that leaves matplotlib's backend alone."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"zoo": ROOT / "zoo", "zoo.training": ROOT / "training", "zoo.evaluation": ROOT / "evaluation",
            "zoo.app": ROOT / "app"}
SCRIPTS = ("examples", "benchmarks", "experiments")


def module_name(path: Path) -> str:
    """The import name of a library file."""
    package, folder = next((name, folder) for name, folder in PACKAGES.items() if path.is_relative_to(folder))
    parts = path.relative_to(folder).with_suffix("").parts
    return ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))


LIBRARY = {module_name(path): path for folder in PACKAGES.values() for path in sorted(folder.rglob("*.py"))}


def imports(path: Path, name: str | None = None) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every import in the file, relative ones resolved against ``name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(package[:len(package) - node.level + 1] + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def layer(module: str) -> str:
    """``zoo.training``, ``zoo.evaluation`` and ``zoo.app`` are layers of their own; the rest of ``zoo`` is the core."""
    for upper in ("zoo.training", "zoo.evaluation", "zoo.app"):
        if module == upper or module.startswith(upper + "."):
            return upper
    return "zoo" if module == "zoo" or module.startswith("zoo.") else "outside"


ALLOWED = {"zoo": {"zoo"}, "zoo.training": {"zoo", "zoo.training"}, "zoo.evaluation": {"zoo", "zoo.evaluation"},
           "zoo.app": {"zoo", "zoo.evaluation", "zoo.app"}}


def test_the_library_modules_are_the_files_of_its_four_folders():
    expected = {"zoo", "zoo.metrics", "zoo.training.train", "zoo.evaluation.harness", "zoo.evaluation.metrics",
                "zoo.app.ui"}
    assert expected <= LIBRARY.keys()
    assert layer("zoo.training.train") == "zoo.training" and layer("zoo.models.cost") == "zoo"
    assert layer("zoo.evaluation") == "zoo.evaluation" and layer("zoology") == "outside"
    assert layer("zoo.app.explorer") == "zoo.app"


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_imports_only_point_down(name):
    """The core imports neither training nor evaluation; training and evaluation never import each other, nor the
    app; no library module imports a script folder (examples, benchmarks, experiments) or their modules."""
    script_modules = {path.stem for folder in SCRIPTS for path in (ROOT / folder).glob("*.py")}
    for module, _ in imports(LIBRARY[name], name):
        top = module.split(".")[0]
        assert top not in {*SCRIPTS, *script_modules, "training", "evaluation"}, f"{name} imports {module}"
        if top == "zoo":
            assert layer(module) in ALLOWED[layer(name)], f"{name} ({layer(name)}) imports {module}"


def public_names(module: str) -> set[str]:
    """What a library module offers: its ``__all__``, or its names without a leading underscore."""
    loaded = importlib.import_module(module)
    return set(getattr(loaded, "__all__", [name for name in vars(loaded) if not name.startswith("_")]))


def private_names(module: str, names: list[str]) -> set[str]:
    """Those of ``names`` taken from library ``module`` that it neither exports nor holds as a submodule."""
    submodules = {name for name in names if f"{module}.{name}" in LIBRARY}
    return set(names) - submodules - public_names(module) - {"*"}


@pytest.mark.parametrize("name", sorted(name for name in LIBRARY if layer(name) == "zoo.app"))
def test_the_app_uses_only_public_library_api(name):
    """The explorer is a layer over the library's public API: from the layers below it takes only what their
    modules export."""
    for module, names in imports(LIBRARY[name], name):
        if module in LIBRARY and layer(module) != "zoo.app":
            private = private_names(module, names)
            assert not private, f"{name} imports {sorted(private)} from {module}, which does not export them"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for f in SCRIPTS for p in (ROOT / f).glob("*.py")))
def test_scripts_use_only_public_library_api(path):
    """Examples, benchmarks and experiments take from the library only what its modules export, and experiments
    import no other script (an example's internals are not an API)."""
    siblings = {p.stem for p in (ROOT / path).parent.glob("*.py")}
    other_scripts = {p.stem for folder in SCRIPTS for p in (ROOT / folder).glob("*.py")} - siblings
    for module, names in imports(ROOT / path):
        assert module.split(".")[0] not in other_scripts | set(SCRIPTS), f"{path} imports {module}"
        if module in LIBRARY:
            private = private_names(module, names)
            assert not private, f"{path} imports {sorted(private)} from {module}, which does not export them"


def test_importing_the_library_leaves_matplotlib_alone():
    """Every library module imported after the user chose a backend: the backend stays, pyplot is not loaded."""
    code = ("import importlib, sys, matplotlib\nmatplotlib.use('svg')\n"
            f"for name in {sorted(LIBRARY)!r}:\n    importlib.import_module(name)\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg", "False"]
