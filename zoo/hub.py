"""Where zoo weights live on the Hugging Face Hub, and offline use of the Hub cache.

The organisation holding the checkpoints is ``interpretable-zoo`` unless the environment variable
``ZOO_HUB_ORG`` names another one (read once, when ``zoo`` is imported). A single load can also point
elsewhere with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=...))``.
"""

import hashlib
import os
import shutil
from pathlib import Path

import timm
import torch
from huggingface_hub import constants

__all__ = ["HUB_ORG", "add_to_hf_cache", "hub_id", "load_model"]

HUB_ORG = os.environ.get("ZOO_HUB_ORG", "interpretable-zoo")


def hub_id(name: str) -> str:
    """Hub repository of a zoo checkpoint, ``<org>/<arch>.<tag>`` as timm names its own."""
    return f"{HUB_ORG}/{name}"


def _sha256(path: Path) -> str:
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
    hashes = {p: _sha256(p) for p in files}
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


def load_model(name: str, weights: str | None, num_classes: int, new_classifier: bool = False,
               **kwargs) -> torch.nn.Module:
    """A registered model for ``num_classes``, random-initialised (``weights=None``) or loaded from weights.

    ``weights``: a ``.safetensors`` file, a folder holding ``model.safetensors`` (a saved Hub folder or a
    training run's ``model/``), an ``org/name`` Hub repository, or ``default`` (the architecture's own tag).
    The checkpoint's classifier is kept, so it must have ``num_classes`` outputs, unless ``new_classifier``
    (fine-tuning on another label set: timm leaves the classifier at its initialisation). ``kwargs`` go to
    ``timm.create_model``.
    """
    if weights is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    overlay = {} if new_classifier else dict(num_classes=num_classes)
    if weights != "default":
        path = Path(weights)
        if path.is_dir():
            path = path / "model.safetensors"
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} not found")
            overlay["file"] = str(path)
        elif "/" in weights and not path.exists():
            overlay["hf_hub_id"] = weights
        else:
            raise ValueError("weights must be a .safetensors file, a folder with model.safetensors, an org/name "
                             f"Hub id or 'default', got {weights!r}")
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
