"""The training loop of every recipe, on Hugging Face Accelerate: CPU, one GPU, many GPUs or nodes alike.

    zoo-train castream_cub --data-root data/CUB_200_2011 --epochs 1 --limit 256
    accelerate launch --multi_gpu --num_processes 8 -m zoo.training.train castream_imagenet

A run lives in its output folder (``runs/<recipe>`` by default):

- ``recipe.json``: the recipe it runs; ``status.json``: ``running`` or ``finished``;
- ``checkpoints/step-<N>/``: the full state: ``model.safetensors`` (the weights), ``state.pt`` (optimiser,
  scheduler, gradient scaler and every process's RNG state), ``progress.json`` (the position in the data and the
  epoch's training sums so far) and ``manifest.json`` (each file's size and SHA-256, written last), all into a
  temporary folder that is then renamed: a killed run leaves no partial checkpoint, and resuming detects a
  damaged one;
- ``metrics.csv`` and ``metrics.jsonl``: per-epoch training loss and validation metrics, one row per epoch
  however often the run was killed and resumed (and TensorBoard when it is installed);
- ``model/``: the final weights in timm's Hub layout (``model.safetensors`` + ``config.json`` with the label
  names), which ``timm.create_model("local-dir:<run>/model", pretrained=True)`` loads.

Starting a recipe again in the same folder resumes from its newest checkpoint whose files match its manifest
(with a notice naming each damaged one passed over) and ends with the weights and metrics the uninterrupted run
gives: the data order is drawn from (seed, epoch) and each image's augmentation from (seed, epoch, index),
whatever the number of processes or data-loading workers. A folder that holds a finished run, or a run of
another recipe, is never overwritten without ``--overwrite``; one that holds no run (no ``recipe.json``), the
working directory or a folder above it, never.

Resuming runs no code a checkpoint could carry: the weights are safetensors, the progress JSON, and ``state.pt``
is read with ``torch.load(weights_only=True)``, whose unpickler builds only torch's short list of plain types
(tensors, numbers, strings, containers of them); any other object is refused with an error naming the file.
Published weights (``model/``) are safetensors.
"""

import argparse
import csv
import errno
import hashlib
import io
import json
import math
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
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from timm.data import resolve_data_config
from timm.models import save_for_hf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import zoo  # noqa: F401  (registers the zoo's models)
from zoo.data import build_dataset, collate
from zoo.data.transforms import eval_transform, train_transform
from zoo.hub import load_model
from zoo.metrics import recognition

from .allocator import keep_freed_memory
from .config import Recipe, list_recipes, load_recipe
from .gradient_denoising import GradientDenoising
from .objectives import Classification, classification_loss, model_logits

__all__ = ["main", "train"]


class SeededAugmentation(Dataset):
    """Draws each sample's random augmentation from (seed, epoch, index) instead of the global RNG."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self.dataset[index]


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


def build_objective(recipe: Recipe) -> Classification | GradientDenoising:
    if recipe.objective == "gradient_denoising":
        return GradientDenoising(recipe.gd_error, recipe.gd_weight)
    return Classification()


def build_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's model with its initial weights; with ``freeze_backbone`` only the stream trains."""
    declared = recipe.model_args.get("num_classes")
    if declared is not None and declared != num_classes:
        raise ValueError(f"recipe {recipe.name!r} sets num_classes={declared} but {recipe.dataset} has "
                         f"{num_classes} classes")
    args = {key: value for key, value in recipe.model_args.items() if key != "num_classes"}
    model = load_model(recipe.model, recipe.weights, num_classes, recipe.new_classifier, **args)
    if recipe.freeze_backbone:
        if not hasattr(model, "freeze_backbone"):
            raise ValueError(f"freeze_backbone: {recipe.model} has no separate backbone to freeze (a CA-Stream "
                             "model has)")
        model.freeze_backbone()
    return model


def build_datasets(recipe: Recipe) -> tuple[Dataset, Dataset, list[str]]:
    """(training set, validation set, class names), transforms set later from the model's data config."""
    train_set = build_dataset(recipe.dataset, recipe.data_root, recipe.train_split, **recipe.dataset_options)
    val_split = recipe.val_split or next(s for s in type(train_set).splits if s != recipe.train_split)
    val_set = build_dataset(recipe.dataset, recipe.data_root, val_split, **recipe.dataset_options)
    if not len(val_set):
        raise ValueError(f"the validation split {val_split!r} of {recipe.dataset} holds no images ({recipe.data_root})")
    return train_set, val_set, list(train_set.classes)


def build_loaders(recipe: Recipe, train_set, val_set, data_config: dict, per_process_batch: int):
    """Training and validation loaders: transforms from ``data_config``; with ``limit`` (``val_limit`` for the
    validation split), a fixed random subset of a split (drawn from the seed, so it spans the classes of a
    dataset stored class by class)."""
    train_set.transforms = train_transform(data_config, recipe.augmentation)
    val_set.transforms = eval_transform(data_config)
    val_limit = recipe.val_limit if recipe.val_limit is not None else recipe.limit
    if recipe.limit is not None:
        train_set = subset(train_set, recipe.limit, recipe.seed)
    if val_limit is not None:
        val_set = subset(val_set, val_limit, recipe.seed)
    if len(train_set) < recipe.batch_size:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of {recipe.batch_size}")
    common = dict(batch_size=per_process_batch, num_workers=recipe.workers, collate_fn=collate)
    train_loader = DataLoader(SeededAugmentation(train_set, recipe.seed), shuffle=True, drop_last=True, **common)
    return train_loader, DataLoader(val_set, shuffle=False, **common)


def subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` images of ``dataset`` drawn at random from ``seed`` (all of it when smaller), in dataset order."""
    if size >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, chosen.sort().values.tolist())


def step_schedule(recipe: Recipe, steps_per_epoch: int):
    """lr factor after ``step`` optimiser steps: linear warm-up, then x gamma at each milestone epoch."""
    warmup = recipe.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        decay = recipe.gamma ** sum(step >= milestone * steps_per_epoch for milestone in recipe.milestones)
        return decay * min(1.0, (step + 1) / warmup) if warmup else decay

    return factor


@torch.no_grad()
def validate(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Loss and accuracy (top-1/top-5), or mAP for multi-hot labels, over the whole validation set."""
    model.eval()
    all_logits, all_labels = [], []
    for images, target in tqdm(loader, desc="validation", leave=False, disable=not accelerator.is_main_process):
        logits = model_logits(model, images)
        logits, labels = accelerator.gather_for_metrics((logits, target["label"].to(logits.device)))
        all_logits.append(logits.float())
        all_labels.append(labels)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = {"val_loss": classification_loss(logits, labels).item()}
    return metrics | {f"val_{key}": value for key, value in recognition(logits, labels).items()}


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
        if json.loads((self.path / "status.json").read_text()).get("state") == "finished":
            raise FileExistsError(f"{self.path} holds a finished run; --overwrite replaces it")
        differences = {key: (value, self.recipe.get(key)) for key, value in json.loads(stored.read_text()).items()
                       if key not in ("workers", "output_dir") and self.recipe.get(key) != value}
        if differences:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
            raise FileExistsError(f"{self.path} holds an unfinished run of another recipe ({listed}); "
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


def add_over_processes(accelerator: Accelerator, totals: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """``totals`` plus ``sums`` added over all processes (each has the same keys)."""
    added = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), reduction="sum")
    return {key: totals.get(key, 0.0) + value for key, value in zip(sums, added.tolist(), strict=True)}


def _trackers() -> list[str] | None:
    from importlib.util import find_spec

    return ["tensorboard"] if find_spec("tensorboard") or find_spec("tensorboardX") else None


def train(recipe: Recipe, overwrite: bool = False, cpu: bool = False) -> Path:
    """Run (or resume) ``recipe``; returns the folder of the final model (``<output_dir>/model``)."""
    run = RunFolder(recipe, overwrite)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        log_with=_trackers(), project_dir=recipe.output_dir,
    )
    share = accelerator.num_processes * recipe.grad_accum
    if recipe.batch_size % share:
        raise ValueError(f"the global batch {recipe.batch_size} does not split over {accelerator.num_processes} "
                         f"processes x {recipe.grad_accum} accumulation steps")
    run.check()
    train_set, val_set, classes = build_datasets(recipe)
    set_seed(recipe.seed)
    model = build_model(recipe, len(classes))  # same seed: identical on every process
    overrides = dict(recipe.data_config)
    if recipe.image_size is not None:
        overrides["input_size"] = (3, recipe.image_size, recipe.image_size)
    data_config = resolve_data_config(overrides, model=model)
    train_loader, val_loader = build_loaders(recipe, train_set, val_set, data_config, recipe.batch_size // share)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    objective = build_objective(recipe)
    resume_from = run.prepare(accelerator)  # once the recipe has proved it can start
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader) // recipe.grad_accum
    # stepped once per optimiser step of the global batch, so not handed to accelerator.prepare
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_schedule(recipe, steps_per_epoch))
    progress = Progress()
    if resume_from is not None:
        progress = restore(*resume_from, accelerator, model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from[0]} (epoch {progress.epoch}, batch {progress.batch})")
    if accelerator.is_main_process:
        accelerator.init_trackers(recipe.name)
    log = MetricsLog(run.path, accelerator, progress.epoch)

    def checkpoint() -> None:
        files = checkpoint_files(accelerator, model, optimizer, scheduler, progress)
        run.save_checkpoint(accelerator, progress.step, recipe.keep_checkpoints, files)

    for epoch in range(progress.epoch, recipe.epochs):
        train_loader.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, progress.batch) if progress.batch else train_loader
        model.train()
        sums: dict[str, float] = {}  # over this process's images since the last checkpoint (then in progress.sums)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", initial=progress.batch,
                   total=len(train_loader), disable=not accelerator.is_main_process)
        for images, target in bar:
            labels = target["label"].to(accelerator.device)
            with accelerator.accumulate(model):
                out = objective(model, images, labels)
                accelerator.backward(out.loss)
                optimizer.step()
                optimizer.zero_grad()
            progress.batch += 1
            seen = {"images": len(labels), "loss": out.loss.item() * len(labels),
                    **{name: value.item() * len(labels) for name, value in out.terms.items()}}
            if labels.ndim == 1:
                seen["correct"] = (out.logits.argmax(1) == labels).sum().item()
            sums = {key: sums.get(key, 0.0) + value for key, value in seen.items()}
            bar.set_postfix({name: f"{value.item():.4f}" for name, value in out.terms.items()}
                            | {"lr": f"{scheduler.get_last_lr()[0]:.2e}"})
            if accelerator.sync_gradients:
                scheduler.step()
                progress.step += 1
                if recipe.checkpoint_every and progress.step % recipe.checkpoint_every == 0 \
                        and progress.batch < len(train_loader):
                    progress.sums, sums = add_over_processes(accelerator, progress.sums, sums), {}
                    checkpoint()
        totals = add_over_processes(accelerator, progress.sums, sums)
        images = totals.pop("images")
        row = {"epoch": epoch + 1, "step": progress.step, "lr": scheduler.get_last_lr()[0]}
        row.update({f"train_{key}": value / images for key, value in totals.items() if key != "correct"})
        if "correct" in totals:
            row["train_top1"] = 100 * totals["correct"] / images
        row.update(validate(model, val_loader, accelerator))
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch + 1}: {row}; lower the lr or check the data")
        log.write(row)
        accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        progress.epoch, progress.batch, progress.sums = epoch + 1, 0, {}
        checkpoint()

    model_dir = run.path / "model"
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        save_for_hf(final, str(model_dir), safe_serialization=True,
                    model_config=dict(label_names=classes, num_classes=len(classes)),
                    model_args={key: v for key, v in recipe.model_args.items() if key != "num_classes"},
                    data_config={key: data_config[key] for key in ("input_size", "interpolation", "crop_pct",
                                                                   "mean", "std")})
    run.finish(accelerator, {"epochs": recipe.epochs, "steps": progress.step})
    accelerator.end_training()
    return model_dir


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. model_args={{\"drop_rate\": 0.1}}), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoo-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a recipe name ({', '.join(list_recipes())}) or a YAML file")
    flags = {"--model": str, "--epochs": int, "--batch-size": int, "--lr": float, "--data-root": str,
             "--weights": str, "--limit": int, "--val-limit": int, "--output-dir": str, "--seed": int,
             "--workers": int, "--image-size": int, "--gd-error": str, "--gd-weight": float, "--mixed-precision": str,
             "--grad-accum": int, "--checkpoint-every": int}
    for flag, kind in flags.items():
        parser.add_argument(flag, type=kind)
    parser.add_argument("--set", action="append", type=_override, default=[], metavar="KEY=VALUE",
                        help="any other recipe setting; VALUE is read as JSON when it parses")
    parser.add_argument("--overwrite", action="store_true", help="replace what the output folder holds")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where a GPU is available")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="leave glibc's malloc as it is; by default it keeps freed memory for reuse "
                             "(training.allocator), faster on a CPU")
    args = parser.parse_args(argv)
    if not args.release_freed_memory:
        keep_freed_memory()
    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in flags}
    overrides = {key: value for key, value in overrides.items() if value is not None} | dict(args.set)
    model_dir = train(load_recipe(args.recipe, **overrides), overwrite=args.overwrite, cpu=args.cpu)
    print(f"weights in {model_dir}: timm.create_model('local-dir:{model_dir}', pretrained=True)")


if __name__ == "__main__":
    main()
