"""Where zoo weights live on the Hugging Face Hub, offline use of the Hub cache, and checkpoint integrity.

The organisation holding the checkpoints is ``interpretable-zoo`` unless the environment variable
``ZOO_HUB_ORG`` names another one (read once, when ``zoo`` is imported). A single load can also point
elsewhere with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=...))``.

A checkpoint is a folder holding ``model.safetensors`` and timm's ``config.json``; weights are only ever
read from safetensors. ``verify_checkpoint`` checks one before it is published or loaded by ``load_model``:
the architecture is one timm knows, the file is complete safetensors whose tensors are those of the model
the config describes, and its SHA-256 is the one ``zoo-publish`` records in ``config.json``.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

__all__ = ["CONFIG_FILE", "HUB_ORG", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "CheckpointError", "add_to_hf_cache",
           "checkpoint_mismatch", "hub_checkpoint", "hub_id", "load_model", "read_config", "sha256",
           "verify_checkpoint", "weights_file"]

HUB_ORG = os.environ.get("ZOO_HUB_ORG", "interpretable-zoo")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never loaded, never published


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded or published; the message names the file and the reason."""


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


def read_config(folder: str | os.PathLike) -> dict:
    """A checkpoint's ``config.json``, refused unless it names an architecture timm knows."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder holds {WEIGHTS_FILE} and timm's {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise CheckpointError(f"{path} names the architecture {architecture!r}, which timm does not know: not a timm "
                              "or zoo model (`import zoo` registers the zoo's; a newer zoo or timm may have it)")
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
    with torch.device("meta"):
        model = timm.create_model(config["architecture"], **{**args, **config.get("model_args", {})})
    problems = checkpoint_mismatch(shapes, {key: value.shape for key, value in model.state_dict().items()})
    if problems:
        raise CheckpointError(f"{weights} does not hold the {config['architecture']} its {CONFIG_FILE} describes "
                              f"(num_classes, model_args): {problems}")
    return config


def hub_checkpoint(repo_id: str) -> Path:
    """The verified local folder (cache snapshot) of a Hub checkpoint; downloads ``config.json`` and
    ``model.safetensors`` only, so pickled weights are never fetched, nor loaded."""
    try:
        folder = Path(hf_hub_download(repo_id, CONFIG_FILE)).parent
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise FileNotFoundError(f"no checkpoint at hf-hub:{repo_id} (not in the local cache, not downloadable: "
                                f"{error})") from None
    try:
        hf_hub_download(repo_id, WEIGHTS_FILE)
    except EntryNotFoundError:
        raise CheckpointError(f"hf-hub:{repo_id} has no {WEIGHTS_FILE} (in the local cache or downloadable): only "
                              "safetensors weights are loaded, never pickled ones") from None
    verify_checkpoint(folder)
    return folder


def weights_file(name: str, weights: str) -> Path:
    """The safetensors file that ``weights`` names for model ``name``, checked: a ``.safetensors`` file (complete), a
    folder holding ``model.safetensors`` or an ``org/name`` Hub repository (``verify_checkpoint``), or
    ``default``: the file of the architecture's own tag (its ``file``, or its Hub repository's ``model.safetensors``
    in the cache, downloaded if need be)."""
    if weights == "default":
        cfg = timm.models.resolve_pretrained_cfg(name)
        if cfg.file:
            return Path(cfg.file)
        if not cfg.hf_hub_id:
            raise ValueError(f"the default weights of {name} are neither a file nor on the Hugging Face Hub")
        repo, _, revision = cfg.hf_hub_id.partition("@")
        try:
            return Path(hf_hub_download(repo, WEIGHTS_FILE, revision=revision or None))
        except (EntryNotFoundError, RepositoryNotFoundError) as error:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} for the default weights of {name} at hf-hub:{cfg.hf_hub_id} "
                                    f"(not in the local cache, not downloadable: {error})") from None
    path = Path(weights)
    if path.is_dir():
        verify_checkpoint(path)
        return path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        _tensor_shapes(path, None)
        return path
    if "/" in weights and not path.exists():
        return hub_checkpoint(weights) / WEIGHTS_FILE
    raise ValueError("weights must be a .safetensors file, a folder with model.safetensors, an org/name "
                     f"Hub id or 'default', got {weights!r}")


def load_model(name: str, weights: str | None, num_classes: int, new_classifier: bool = False,
               **kwargs) -> torch.nn.Module:
    """A registered model for ``num_classes``, random-initialised (``weights=None``) or loaded from weights.

    ``weights``: a ``.safetensors`` file, a folder holding ``model.safetensors`` (a saved Hub folder or a
    training run's ``model/``), an ``org/name`` Hub repository, or ``default`` (the architecture's own tag).
    Checked first as ``weights_file`` describes.
    The checkpoint's classifier is kept, so it must have ``num_classes`` outputs, unless ``new_classifier``
    (fine-tuning on another label set: timm leaves the classifier at its initialisation). ``kwargs`` go to
    ``timm.create_model``.
    """
    if weights is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    overlay = {} if new_classifier else dict(num_classes=num_classes)
    if weights != "default":  # timm resolves the default tag itself
        overlay["file"] = str(weights_file(name, weights))
    if new_classifier:  # any class count other than the checkpoint's makes timm drop its classifier
        overlay["num_classes"] = -1
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        raise ValueError(f"weights {weights} do not fit {name} with {num_classes} classes: saved from another "
                         "architecture, or for another class count (new_classifier=True fine-tunes on new classes)"
                         f"\n{str(error)[:2000]}") from None
