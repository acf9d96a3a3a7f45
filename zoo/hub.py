"""Where zoo weights live on the Hugging Face Hub, offline use of the Hub cache, and checkpoint integrity.

The organisation holding the checkpoints is ``interpretable-zoo`` unless the environment variable
``ZOO_HUB_ORG`` names another one (read once, when ``zoo`` is imported). A single load can also point
elsewhere with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=...))``.

A checkpoint is a folder holding ``model.safetensors`` and timm's ``config.json``; weights are only ever
read from safetensors. ``verify_checkpoint`` checks one before it is published or loaded by ``load_model`` (and
a zoo model's by timm's ``local-dir:`` and ``hf-hub:``, through ``verify_source``): the architecture is one timm
knows, ``config.json``'s fields have their types (``num_classes`` an integer, ``input_size`` three, ...), the file is
complete safetensors whose tensors are those of the model the config describes, and its SHA-256 is the one
``zoo-publish`` and ``zoo-train`` record in ``config.json``.

``resolve_weights`` is the one way weights are named, everywhere (``zoo-eval --weights``, a recipe's ``weights``,
the demo), with timm's own names: ``local-dir:<folder>``, ``hf-hub:<org>/<name>[@revision]``, a registered
``arch.tag`` or ``default`` (the architecture's own tag), and also a checkpoint folder, an ``org/name`` Hub
repository or a bare ``.safetensors`` file. ``load_model`` builds a model from them as timm's ``local-dir:`` and
``hf-hub:`` do: with the checkpoint's ``model_args`` (explicit arguments win) and its input size, interpolation,
crop and mean/std as the model's pretrained config (what ``timm.data.resolve_data_config`` reads).
"""

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg, split_model_name_tag

__all__ = ["CONFIG_FILE", "HF_HUB", "HUB_ORG", "LOCAL_DIR", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "CheckpointError",
           "FreshPoolingWarning", "Weights", "add_to_hf_cache", "checkpoint_mismatch", "hub_checkpoint", "hub_id",
           "load_model", "read_config", "resolve_weights", "sha256", "verify_checkpoint", "verify_source"]

HUB_ORG = os.environ.get("ZOO_HUB_ORG", "interpretable-zoo")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never loaded, never published
DATA_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")  # of a pretrained config
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded or published; the message names the file and the reason."""


class FreshPoolingWarning(UserWarning):
    """Weights loaded into a model leave part of it (a CA-Stream's stream, SimPool's pooling) at its random
    initialisation: they are a backbone's only."""


def hub_id(name: str) -> str:
    """Hub repository of a zoo checkpoint, ``<org>/<arch>.<tag>`` as timm names its own."""
    return f"{HUB_ORG}/{name}"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_to_hf_cache(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike | None = None,
                    revision: str = "main") -> Path:
    """Install the files of a saved Hub folder into the Hugging Face cache, as a download would.

    Writes the layout ``hf_hub_download`` reads (``models--org--name/{blobs,snapshots/<commit>,refs}``),
    so ``timm.create_model(..., pretrained=True)`` and ``hf-hub:org/name`` load it with
    ``HF_HUB_OFFLINE=1``. The commit id is derived from the file contents. Returns the snapshot folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no files to put in the cache")
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    hashes = {p: sha256(p) for p in files}
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}:{h}\n" for p, h in hashes.items()).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for path, digest in hashes.items():
        blob = repo_dir / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # file systems without symlinks: huggingface_hub copies too
            shutil.copyfile(blob, link)
    refs = repo_dir / "refs" / revision
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    return snapshot


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _config_problem(config: dict) -> str:
    """What is wrong with the types of a checkpoint config's fields, or ""."""
    pretrained_cfg = config.get("pretrained_cfg", {})
    fields = {**{key: config[key] for key in ("num_classes", "num_features", "label_names", "model_args",
                                              "pretrained_cfg", "weights_sha256") if key in config},
              **({f"pretrained_cfg.{key}": value for key, value in pretrained_cfg.items() if key in DATA_FIELDS}
                 if isinstance(pretrained_cfg, dict) else {})}
    for key, value in fields.items():
        expected = CONFIG_TYPES[key.rpartition(".")[2]]
        if not expected[0](value):
            return f"{key} must be {expected[1]}, got {value!r}"
    names, classes = config.get("label_names"), config.get("num_classes")
    if names and classes and len(names) != classes:
        return f"label_names holds {len(names)} names for num_classes {classes}"
    return ""


CONFIG_TYPES = {  # a config.json field: (its test, what it must be)
    "num_classes": (_is_count, "a non-negative integer"),
    "num_features": (_is_count, "a non-negative integer"),
    "label_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
    "model_args": (lambda v: isinstance(v, dict), "an object of keyword arguments"),
    "pretrained_cfg": (lambda v: isinstance(v, dict), "an object"),
    "weights_sha256": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
                       "64 lowercase hexadecimal digits"),
    "input_size": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_count(n) and n > 0 for n in v),
                   "[channels, height, width] of positive integers"),
    "interpolation": (lambda v: isinstance(v, str), "a string such as 'bicubic'"),
    "crop_pct": (lambda v: _is_number(v) and 0 < v, "a positive number"),
    "crop_mode": (lambda v: isinstance(v, str), "a string such as 'center'"),
    "mean": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(n) for n in v), "a list of numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(n) and n > 0 for n in v),
            "a list of positive numbers"),
}


def read_config(folder: str | os.PathLike) -> dict:
    """A checkpoint's ``config.json``, refused unless it names an architecture timm knows."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder holds {WEIGHTS_FILE} and timm's {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of timm's fields")
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise CheckpointError(f"{path} names the architecture {architecture!r}, which timm does not know: not a timm "
                              "or zoo model (`import zoo` registers the zoo's; a newer zoo or timm may have it)")
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return config


def _tensor_shapes(path: Path, expected_sha256: str | None) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of a safetensors file, once the file is known complete and (if given) unaltered."""
    try:
        with safe_open(path, "pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a complete safetensors file ({error}): truncated or corrupted, "
                              "download or save it again") from None
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in its {CONFIG_FILE}: altered or corrupted "
                              "since it was published, download it again")
    return shapes


def checkpoint_mismatch(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                        any_shape: Collection[str] = ()) -> str:
    """Why tensors of the shapes ``found`` (name -> shape) do not load into a model whose state dict has the shapes
    ``expected``: the count and first few of the missing keys (BatchNorm's ``num_batches_tracked`` counters, which
    older checkpoints lack, excepted), of the unexpected keys and of the keys of another shape (but those in
    ``any_shape``); "" when they fit."""
    missing = sorted(k for k in expected.keys() - found.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(found.keys() - expected.keys())
    wrong_shape = [f"{k} {tuple(found[k])} vs {tuple(expected[k])}" for k in sorted(expected.keys() & found.keys())
                   if k not in any_shape and tuple(found[k]) != tuple(expected[k])]
    return "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected),
                      ("shape mismatches, checkpoint vs model", wrong_shape)) if keys)


def _data_cfg(pretrained_cfg: Mapping) -> dict:
    """The preprocessing fields (``DATA_FIELDS``) a pretrained config sets."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in pretrained_cfg.items()
            if key in DATA_FIELDS and value is not None}


def verify_checkpoint(folder: str | os.PathLike) -> dict:
    """Check a checkpoint folder before it is loaded or published; returns its config.

    Raises ``CheckpointError`` when ``model.safetensors`` is missing (pickled weights such as
    ``pytorch_model.bin`` are never read instead), truncated or corrupted, differs from the ``weights_sha256``
    recorded in ``config.json``, or holds other tensors than the model ``config.json`` describes
    (``architecture``, ``num_classes``, ``model_args``); or when the architecture is unknown to timm.
    """
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        refused = f"; pickled weights ({', '.join(pickled)}) are never loaded" if pickled else ""
        raise CheckpointError(f"{folder} holds no {WEIGHTS_FILE}{refused}")
    config = read_config(folder)
    shapes = _tensor_shapes(weights, config.get("weights_sha256"))
    args = {"num_classes": config["num_classes"]} if "num_classes" in config else {}
    overlay = _data_cfg(config.get("pretrained_cfg", {}))  # as local-dir: builds it (a ViT's fixed input size)
    with torch.device("meta"):
        model = timm.create_model(config["architecture"], pretrained_cfg_overlay=overlay,
                                  **{**args, **config.get("model_args", {})})
    problems = checkpoint_mismatch(shapes, {key: value.shape for key, value in model.state_dict().items()})
    if problems:
        raise CheckpointError(f"{weights} does not hold the {config['architecture']} its {CONFIG_FILE} describes "
                              f"(num_classes, model_args): {problems}")
    return config


def verify_source(pretrained_cfg: Mapping | None) -> None:
    """``verify_checkpoint`` on the folder timm's ``local-dir:`` or ``hf-hub:`` loads a model from (a pretrained
    config's ``source``), before timm reads it: nothing else is checked."""
    source = pretrained_cfg.get("source") if isinstance(pretrained_cfg, Mapping) else None  # or a tag, a name
    if source == "local-dir":
        verify_checkpoint(pretrained_cfg["file"])
    elif source == "hf-hub":
        hub_checkpoint(pretrained_cfg["hf_hub_id"])


def hub_checkpoint(repo_id: str) -> Path:
    """The verified local folder (cache snapshot) of a Hub checkpoint, ``org/name`` or ``org/name@revision``;
    downloads ``config.json`` and ``model.safetensors`` only, so pickled weights are never fetched, nor loaded."""
    repo, _, revision = repo_id.partition("@")
    try:
        folder = Path(hf_hub_download(repo, CONFIG_FILE, revision=revision or None)).parent
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise FileNotFoundError(f"no checkpoint at hf-hub:{repo_id} (not in the local cache, not downloadable: "
                                f"{error})") from None
    try:
        hf_hub_download(repo, WEIGHTS_FILE, revision=revision or None)
    except EntryNotFoundError:
        raise CheckpointError(f"hf-hub:{repo_id} has no {WEIGHTS_FILE} (in the local cache or downloadable): only "
                              "safetensors weights are loaded, never pickled ones") from None
    verify_checkpoint(folder)
    return folder


@dataclass(frozen=True)
class Weights:
    """Weights as ``resolve_weights`` found them: their checked safetensors file and what their checkpoint says."""

    file: Path
    architecture: str | None = None  # the checkpoint's (its config.json's or its tag's); None for a bare file
    model_args: dict = field(default_factory=dict)  # config.json's, but num_classes (the task decides it)
    pretrained_cfg: dict = field(default_factory=dict)  # config.json's or the tag's
    hub_repo: str | None = None  # the Hugging Face Hub repository they come from (a local folder or file: None)
    label_names: tuple[str, ...] | None = None  # config.json's class names, one per output

    @property
    def data_cfg(self) -> dict:
        """Their input size, interpolation, crop and mean/std, where their config gives them."""
        return _data_cfg(self.pretrained_cfg)

    def model_args_for(self, name: str, **kwargs) -> dict:
        """What model ``name`` is built with from these weights: the checkpoint's ``model_args`` where it is a
        ``name`` itself (not, say, a backbone's checkpoint), overridden by ``kwargs``."""
        own = self.model_args if self.architecture == split_model_name_tag(name)[0] else {}
        return {**own, **kwargs}


def _checkpoint(folder: Path, hub_repo: str | None = None) -> Weights:
    config = verify_checkpoint(folder)
    args = {key: value for key, value in config.get("model_args", {}).items() if key != "num_classes"}
    names = config.get("label_names")
    return Weights(folder / WEIGHTS_FILE, config["architecture"], args, config.get("pretrained_cfg", {}), hub_repo,
                   tuple(names) if names else None)


def _tagged(cfg, what: str) -> Weights:
    """The safetensors file of a registered tag's pretrained config: its ``file``, or its Hub repository's
    ``model.safetensors`` (in the cache, downloaded if need be)."""
    if cfg.file:
        file = Path(cfg.file)
    elif cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        try:
            file = Path(hf_hub_download(repo, WEIGHTS_FILE, revision=revision or None))
        except (EntryNotFoundError, RepositoryNotFoundError) as error:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} for {what} at hf-hub:{cfg.hf_hub_id} (not in the local cache, "
                                    f"not downloadable: {error})") from None
    else:
        raise ValueError(f"{what} are neither a file nor on the Hugging Face Hub")
    _tensor_shapes(file, None)
    return Weights(file, cfg.architecture, {}, cfg.to_dict(), None if cfg.file else cfg.hf_hub_id.partition("@")[0])


def resolve_weights(name: str, weights: str) -> Weights:
    """The weights ``weights`` names for model ``name``, checked (``verify_checkpoint`` for a checkpoint folder,
    complete safetensors otherwise), named as timm names them:

    - ``local-dir:<folder>`` or a folder: a checkpoint folder (``model.safetensors`` + ``config.json``), such as a
      training run's ``model/``;
    - ``hf-hub:<org>/<name>[@revision]`` or ``<org>/<name>``: a Hub checkpoint (the cache, downloaded if need be);
    - ``<arch>.<tag>``: a registered tag's weights; ``default``: those of ``name``'s own default tag;
    - a ``.safetensors`` file: the tensors alone (no config).
    """
    if weights.startswith(LOCAL_DIR):
        folder = Path(weights.removeprefix(LOCAL_DIR))
        if not folder.is_dir():
            raise FileNotFoundError(f"weights {weights}: no folder {folder}")
        return _checkpoint(folder)
    if weights.startswith(HF_HUB):
        repo_id = weights.removeprefix(HF_HUB)
        return _checkpoint(hub_checkpoint(repo_id), repo_id.partition("@")[0])
    if weights == "default":
        return _tagged(resolve_pretrained_cfg(name), f"the default weights of {name}")
    path = Path(weights)
    if path.is_dir():
        return _checkpoint(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        _tensor_shapes(path, None)
        return Weights(path)
    architecture, tag = split_model_name_tag(weights)
    if tag and "/" not in weights and timm.is_model(architecture):
        try:
            return _tagged(get_pretrained_cfg(weights), f"the weights {weights}")
        except RuntimeError as error:  # timm: an architecture it knows, a tag it does not
            raise ValueError(f"weights {weights!r}: {error} (timm.list_pretrained('{architecture}*') lists its "
                             "tags)") from None
    if "/" in weights and not path.exists():
        return _checkpoint(hub_checkpoint(weights), weights.partition("@")[0])
    raise ValueError(f"weights must be local-dir:<folder>, hf-hub:<org>/<name>, a registered <arch>.<tag>, "
                     f"'default', a checkpoint folder, an org/name Hub id or a .safetensors file, got {weights!r}")


def _fresh_modules(model: torch.nn.Module, file: Path, new_classifier: bool) -> dict[str, int]:
    """The top-level modules of ``model`` (with their tensor counts) that ``file`` holds no tensor for, the
    classifier aside where ``new_classifier``: a backbone-only checkpoint's tensors are named without ``backbone.``."""
    with safe_open(file, "pt") as opened:
        held = set(opened.keys())
    classifier = (model.pretrained_cfg.get("classifier") or "") if new_classifier else ""
    fresh: dict[str, int] = {}
    for key in model.state_dict():
        if (key in held or key.removeprefix("backbone.") in held or key.endswith("num_batches_tracked")
                or (classifier and key.startswith(f"{classifier}."))):
            continue
        module = key.partition(".")[0]
        fresh[module] = fresh.get(module, 0) + 1
    return fresh


def load_model(name: str, weights: str | Weights | None, num_classes: int, new_classifier: bool = False,
               fresh_pooling: bool = False, **kwargs) -> torch.nn.Module:
    """A registered model for ``num_classes``, random-initialised (``weights=None``) or loaded from weights.

    ``weights``: any name ``resolve_weights`` takes (checked first as it describes), or what it returned. As
    timm's ``local-dir:`` and ``hf-hub:`` load a checkpoint, the model is built with its ``model_args`` where
    it is a ``name`` (``kwargs``, which go to ``timm.create_model``, win), and its pretrained config carries the
    weights' input size, interpolation, crop and mean/std.
    The checkpoint's classifier is kept, so it must have ``num_classes`` outputs (and its config's ``label_names``
    are the model's ``pretrained_cfg["label_names"]``), unless ``new_classifier``
    (fine-tuning on another label set: timm leaves the classifier at its initialisation).
    Backbone-only weights (a GAP ResNet's) loaded into a CA-Stream or SimPool leave its pooling at its random
    initialisation: a ``FreshPoolingWarning`` says so, unless ``fresh_pooling`` says that is the intent (the
    training recipes, which start stream training so).
    """
    if weights is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    if isinstance(weights, str):
        weights = resolve_weights(name, weights)
    # any class count other than the checkpoint's makes timm drop its classifier
    overlay = {**weights.data_cfg, "file": str(weights.file), "num_classes": -1 if new_classifier else num_classes}
    if weights.label_names and not new_classifier:  # as timm's own local-dir: and hf-hub: loading keeps them
        overlay["label_names"] = list(weights.label_names)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                  **weights.model_args_for(name, **kwargs))
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        raise ValueError(f"weights {weights.file} do not fit {name} with {num_classes} classes: saved from another "
                         "architecture, or for another class count (new_classifier=True fine-tunes on new classes)"
                         f"\n{str(error)[:2000]}") from None
    fresh = {} if fresh_pooling else _fresh_modules(model, weights.file, new_classifier)
    if fresh:
        parts = ", ".join(f"{module} ({count} tensors)" for module, count in fresh.items())
        warnings.warn(f"weights {weights.file} hold no tensors for the {parts} of {name}: they are a backbone's only, "
                      f"so {name}'s pooling keeps its random initialisation (the start of stream training; "
                      "fresh_pooling=True says it is meant). Load a checkpoint of the whole model to use a trained "
                      "one.", FreshPoolingWarning, stacklevel=2)
    return model
