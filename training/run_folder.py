"""What a run keeps in its folder, and how it is read back: checkpoints, metrics, status.

- ``recipe.json``: the recipe it runs; ``status.json``: ``running`` or ``finished``;
- ``checkpoints/step-<N>/``: the full state: ``model.safetensors`` (the weights), ``state.pt`` (optimiser,
  scheduler, gradient scaler and every process's RNG state), ``progress.json`` (the position in the data and the
  epoch's training sums so far) and ``manifest.json`` (each file's size and SHA-256, written last), all into a
  temporary folder that is then renamed: a killed run leaves no partial checkpoint, and resuming detects a
  damaged one;
- ``metrics.csv`` and ``metrics.jsonl``: one row per epoch however often the run was killed and resumed.

Resuming runs no code a checkpoint could carry: the weights are safetensors, the progress JSON, and ``state.pt``
is read with ``torch.load(weights_only=True)``, whose unpickler builds only torch's short list of plain types
(tensors, numbers, strings, containers of them); any other object is refused with an error naming the file.

Not Accelerate's ``save_state``/``load_state`` with ``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=...)``: (as of accelerate 1.16) ``save_state`` writes each file in place into the final
``checkpoint_<i>`` folder, with no manifest and no rename, after deleting the oldest checkpoints, so a kill or a
full disk mid-save leaves a partial checkpoint that ``load_state`` later loads without noticing; and
``load_state`` unpickles registered objects (``register_for_checkpointing``, where the position in the data
would go) with ``weights_only=False``.
"""

import csv
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from .config import Recipe

__all__ = ["DamagedCheckpoint", "MetricsLog", "Progress", "RunFolder", "checkpoint_files", "finished_model",
           "is_finished", "read_checkpoint", "restore", "write_checkpoint"]


@dataclass
class Progress:
    """Where the run is: saved with every checkpoint (``progress.json``)."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimiser steps done
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's training sums, all processes, until now


CHECKPOINT_FILES = ("model.safetensors", "state.pt", "progress.json")
MANIFEST = "manifest.json"  # each file's size and SHA-256, written last


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def rng_state() -> dict:
    """This process's random number generators, as numbers and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Set this process's random number generators to what ``rng_state`` returned."""
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    random.setstate(state["python"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_files(accelerator: Accelerator, model, optimizer, scheduler, progress: Progress) -> dict[str, bytes]:
    """The files of a checkpoint, on the main process (none on the others, which hand it their RNG state)."""
    rng = gather_object([rng_state()])
    if not accelerator.is_main_process:
        return {}
    weights = {name: tensor.contiguous() for name, tensor in accelerator.get_state_dict(model).items()}
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    state = io.BytesIO()
    torch.save(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler, rng=rng), state)
    return {"model.safetensors": safetensors.torch.save(weights), "state.pt": state.getvalue(),
            "progress.json": json.dumps(asdict(progress)).encode()}


def write_checkpoint(folder: Path, files: dict[str, bytes]) -> None:
    """``files`` into ``folder``, each flushed to the disk, then the manifest that seals them."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    for name, data in [*files.items(), (MANIFEST, json.dumps({"files": manifest}, indent=2).encode())]:
        with open(folder / name, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())


def read_checkpoint(folder: Path) -> dict[str, bytes]:
    """The files of checkpoint ``folder``, each checked against the size and SHA-256 its manifest lists."""
    try:
        listed = {name: (entry["size"], entry["sha256"])
                  for name, entry in json.loads((folder / MANIFEST).read_bytes())["files"].items()}
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:  # missing, not JSON, misshapen
        raise DamagedCheckpoint(f"no readable {MANIFEST}: {error}") from None
    if sorted(listed) != sorted(CHECKPOINT_FILES):
        raise DamagedCheckpoint(f"its manifest lists {', '.join(sorted(listed))}, not {', '.join(CHECKPOINT_FILES)}")
    files = {}
    for name, (size, sha256) in listed.items():
        try:
            files[name] = (folder / name).read_bytes()
        except OSError as error:
            raise DamagedCheckpoint(f"{name}: {error.strerror}") from None
        if len(files[name]) != size:
            raise DamagedCheckpoint(f"{name} has {len(files[name])} bytes, its manifest says {size}")
        if hashlib.sha256(files[name]).hexdigest() != sha256:
            raise DamagedCheckpoint(f"{name} does not have the SHA-256 its manifest lists")
    return files


@contextmanager
def refusing(path: Path):
    """Any error while loading the checkpoint file ``path``: a ValueError that names it."""
    try:
        yield
    except pickle.UnpicklingError as error:  # torch's weights-only unpickler met something other than plain data
        named = re.search(r"GLOBAL (\S+)", str(error))
        raise ValueError(f"{path} asks to build an object{f' ({named[1]})' if named else ''}, not only plain data: "
                         "refused, resuming never runs code a checkpoint carries") from error
    except Exception as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(f"{path} does not hold what a checkpoint's {path.name} holds, refused: {reason}") from error


def restore(folder: Path, files: dict[str, bytes], accelerator: Accelerator, model, optimizer, scheduler) -> Progress:
    """Load the verified ``files`` of checkpoint ``folder`` into the run; where the run is. A file that holds
    anything but what ``checkpoint_files`` writes (an object to build, for one) is refused, its path named."""
    with refusing(folder / "model.safetensors"):
        accelerator.unwrap_model(model).load_state_dict(safetensors.torch.load(files["model.safetensors"]))
    with refusing(folder / "state.pt"):
        state = torch.load(io.BytesIO(files["state.pt"]), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        if accelerator.process_index < len(state["rng"]):
            set_rng_state(state["rng"][accelerator.process_index])
        else:
            print(f"{folder} was saved by {len(state['rng'])} processes: process {accelerator.process_index}'s "
                  "random numbers start from the seed")
    with refusing(folder / "progress.json"):
        return Progress(**json.loads(files["progress.json"]))


def is_finished(folder: Path | str) -> bool:
    """Whether ``folder`` holds a finished run (its ``status.json`` says so): its ``model/`` is final."""
    status = Path(folder) / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def recipe_differences(stored: dict, recipe: dict) -> str:
    """What ``recipe`` changes from the ``stored`` one, "key: old -> new, ..."; empty when it is the same run (the
    number of data workers, where images are decoded and the folder do not make another run)."""
    return ", ".join(f"{key}: {value!r} -> {recipe.get(key)!r}" for key, value in stored.items()
                     if key not in ("workers", "decode", "output_dir") and recipe.get(key) != value)


def finished_model(recipe: Recipe) -> Path | None:
    """The ``model/`` folder of ``recipe``'s finished run in its output_dir, to reuse; None when no run finished
    there. A finished run of another recipe is refused, never taken for this one."""
    folder = Path(recipe.output_dir)
    if not is_finished(folder):
        return None
    differences = recipe_differences(json.loads((folder / "recipe.json").read_text()), recipe.to_dict())
    if differences:
        raise FileExistsError(f"{folder} holds a finished run of another recipe ({differences}): choose another "
                              "folder, or remove it to train this recipe")
    return folder / "model"


class RunFolder:
    """The output folder: refuses to overwrite, finds the checkpoint to resume, writes checkpoints atomically."""

    def __init__(self, recipe: Recipe, overwrite: bool):
        self.path = Path(recipe.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.recipe = recipe.to_dict()
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse a folder that holds something else than an unfinished run of this recipe (unless overwriting a
        run), and ever to replace the working directory or a folder above it."""
        stored = self.path / "recipe.json"
        if self.path.exists() and Path.cwd().resolve().is_relative_to(self.path.resolve()):
            raise FileExistsError(f"output_dir {str(self.path)!r} holds the working directory: choose a folder of "
                                  "its own for the run")
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if not stored.exists():
            raise FileExistsError(f"{self.path} is not empty and holds no run (no recipe.json), so it is neither "
                                  "resumed nor replaced, even with --overwrite: choose another output_dir")
        if self.overwrite:
            return
        if is_finished(self.path):
            raise FileExistsError(f"{self.path} holds a finished run; --overwrite replaces it")
        differences = recipe_differences(json.loads(stored.read_text()), self.recipe)
        if differences:
            raise FileExistsError(f"{self.path} holds an unfinished run of another recipe ({differences}); "
                                  "--overwrite replaces it, or choose another output_dir")

    def prepare(self, accelerator: Accelerator) -> tuple[Path, dict[str, bytes]] | None:
        """Set the folder up (main process); the checkpoint to resume from and its files, if any."""
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.overwrite and self.path.exists():
                shutil.rmtree(self.path)
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            for partial in self.checkpoints.glob(".partial-*"):  # a killed run's
                shutil.rmtree(partial)
            (self.path / "recipe.json").write_text(json.dumps(self.recipe, indent=2))
            (self.path / "status.json").write_text(json.dumps({"state": "running"}))
        accelerator.wait_for_everyone()
        return self.newest_checkpoint(accelerator)

    def newest_checkpoint(self, accelerator: Accelerator) -> tuple[Path, dict[str, bytes]] | None:
        """The newest checkpoint that its manifest verifies, and its files; each damaged one passed over gets a
        one-line notice. Only damaged ones: an error naming the folder."""
        damaged = []
        for folder in sorted(self.checkpoints.glob("step-*"), reverse=True):
            try:
                files = read_checkpoint(folder)
            except DamagedCheckpoint as problem:
                damaged.append(f"{folder} ({problem})")
                continue
            for checkpoint in damaged:
                accelerator.print(f"checkpoint {checkpoint} is damaged: resuming from {folder.name}, before it")
            return folder, files
        if damaged:
            raise RuntimeError(f"no usable checkpoint in {self.checkpoints}: {'; '.join(damaged)} damaged; "
                               "--overwrite starts the run again")
        return None

    def save_checkpoint(self, accelerator: Accelerator, step: int, keep: int, files: dict[str, bytes]) -> None:
        """Write ``files`` (the main process's; the others pass none) as ``step-<step>``, keeping the ``keep``
        newest. A failed write (a full disk) removes what it wrote and raises an OSError on every process."""
        failure = None
        if accelerator.is_main_process:
            target = self.checkpoints / f"step-{step:08d}"
            partial = self.checkpoints / f".partial-{target.name}"
            try:
                write_checkpoint(partial, files)
            except OSError as error:
                shutil.rmtree(partial, ignore_errors=True)
                failure = (error.errno, self.write_failure(error, target))
            else:
                if target.exists():
                    shutil.rmtree(target)
                partial.rename(target)
                for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
                    shutil.rmtree(old)
        (failure,) = broadcast_object_list([failure])
        if failure is not None:
            raise OSError(*failure)

    def write_failure(self, error: OSError, target: Path) -> str:
        """What went wrong writing checkpoint ``target``, and what is left."""
        cause = "no space left on the device" if error.errno in (errno.ENOSPC, errno.EDQUOT) else str(error)
        earlier = sorted(self.checkpoints.glob("step-*"))
        kept = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "there is no earlier checkpoint"
        return (f"{cause} while writing the checkpoint {target}: what it wrote is removed and {kept}; the same "
                "command resumes once the checkpoint can be written")

    def finish(self, accelerator: Accelerator, summary: dict) -> None:
        if accelerator.is_main_process:
            (self.path / "status.json").write_text(json.dumps({"state": "finished", **summary}, indent=2))


class MetricsLog:
    """Per-epoch metrics to ``metrics.csv`` and ``metrics.jsonl`` (main process), one row per epoch however the run
    was killed and resumed, and Accelerate's trackers."""

    def __init__(self, folder: Path, accelerator: Accelerator, epochs_done: int):
        """Rows of epochs after the ``epochs_done`` the checkpoint resumed from are dropped: they are run again."""
        self.folder, self.accelerator, self.rows = folder, accelerator, []
        if accelerator.is_main_process and (folder / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            self.rows = [row for row in rows if row["epoch"] <= epochs_done]
            self.save()

    def write(self, row: dict) -> None:
        self.accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        if self.accelerator.is_main_process:
            self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
            self.save()

    def save(self) -> None:
        """Both files replaced whole, so that a kill leaves the old ones or the new ones."""
        table = io.StringIO()
        writer = csv.DictWriter(table, list(dict.fromkeys(key for row in self.rows for key in row)))
        writer.writeheader()
        writer.writerows(self.rows)
        for name, text in (("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.rows)),
                           ("metrics.csv", table.getvalue())):
            partial = self.folder / f".{name}.partial"
            partial.write_text(text, newline="")
            partial.replace(self.folder / name)
