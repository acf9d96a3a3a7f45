"""The training loop of every recipe, on Hugging Face Accelerate: CPU, one GPU, many GPUs or nodes alike.

    zoo-train castream_cub --data-root data/CUB_200_2011 --epochs 1 --limit 256
    accelerate launch --multi_gpu --num_processes 8 -m zoo.training.train castream_imagenet

A run lives in its output folder (``runs/<recipe>`` by default): ``recipe.json``, ``status.json``, checkpoints
sealed by SHA-256 manifests, ``metrics.csv``/``metrics.jsonl`` with one row per epoch (``run_folder.py``), and
``model/``: the final weights in timm's Hub layout (``model.safetensors`` + ``config.json`` with the label names and
the weights' SHA-256, verified whenever the folder is loaded), which
``timm.create_model("local-dir:<run>/model", pretrained=True)`` loads.

``train`` reads as a plain PyTorch loop: ``set_up`` (accelerator, data, model, optimiser, schedule, resume),
then per epoch ``train_one_epoch`` and ``validate``, then ``export``. Accelerate appears only where distribution
needs it: ``prepare``, ``accumulate``, ``backward``, ``gather_for_metrics`` and ``reduce``.

Starting a recipe again in the same folder resumes from its newest checkpoint whose files match its manifest
(with a notice naming each damaged one passed over) and ends with the weights and metrics the uninterrupted run
gives: the data order is drawn from (seed, epoch) and each image's augmentation from (seed, epoch, index),
whatever the number of processes or data-loading workers. A folder that holds a finished run, or a run of
another recipe, is never overwritten without ``--overwrite``; one that holds no run (no ``recipe.json``), the
working directory or a folder above it, never. Resuming loads only plain data (safetensors, JSON and
``torch.load(weights_only=True)``); published weights (``model/``) are safetensors.
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import resolve_data_config
from timm.models import save_for_hf
from timm.scheduler.scheduler import Scheduler
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import zoo  # noqa: F401  (registers the zoo's models)
from zoo.data import build_dataset, collate, sample_indices
from zoo.data.device import decoding_transforms
from zoo.data.transforms import CONFIG_KEYS, eval_transform, train_transform
from zoo.hub import CONFIG_FILE, WEIGHTS_FILE, load_model, resolve_weights, sha256
from zoo.metrics import recognition
from zoo.output import checked_inputs

from .allocator import keep_freed_memory
from .config import Recipe, list_recipes, load_recipe
from .gradient_denoising import GradientDenoising
from .objectives import Classification, StepOutput, classification_loss, model_logits
from .optimiser import create_optimizer, create_schedule
from .run_folder import MetricsLog, Progress, RunFolder, checkpoint_files, restore

__all__ = ["Run", "SeededAugmentation", "build_datasets", "build_loaders", "build_model", "build_objective",
           "export", "main", "run_record", "set_up", "starting_weights", "subset", "train",
           "train_one_epoch", "validate"]

POSTFIX_SECONDS = 1.0  # the progress bar's loss and lr, refreshed at most this often


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


def build_objective(recipe: Recipe) -> Classification | GradientDenoising:
    """What the recipe's training steps minimise."""
    if recipe.objective == "gradient_denoising":
        return GradientDenoising(recipe.gd_error, recipe.gd_weight)
    return Classification()


def build_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's model with its initial weights; with ``freeze_backbone`` only the pooling (a CA-Stream's
    stream, SimPool) trains."""
    declared = recipe.model_args.get("num_classes")
    if declared is not None and declared != num_classes:
        raise ValueError(f"recipe {recipe.name!r} sets num_classes={declared} but {recipe.dataset} has "
                         f"{num_classes} classes")
    args = {key: value for key, value in recipe.model_args.items() if key != "num_classes"}
    model = load_model(recipe.model, recipe.weights, num_classes, recipe.new_classifier, fresh_pooling=True, **args)
    if recipe.freeze_backbone:
        if not hasattr(model, "freeze_backbone"):
            raise ValueError(f"freeze_backbone: {recipe.model} has no separate backbone to freeze (a CA-Stream "
                             "or SimPool model has)")
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


def build_loaders(recipe: Recipe, train_set, val_set, data_config: dict, per_process_batch: int,
                  device: torch.device):
    """Training and validation loaders: transforms from ``data_config``, run in the workers or, where
    ``recipe.decode`` says so, on ``device`` as each batch moves there (``zoo.data.device``); with ``limit``
    (``val_limit`` for the validation split), a fixed random subset of a split (drawn from the seed, so it spans the
    classes of a dataset stored class by class)."""
    for data, transforms in ((train_set, train_transform(data_config, recipe.augmentation)),
                             (val_set, eval_transform(data_config))):
        data.transforms = decoding_transforms(recipe.decode, data, transforms, device)
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
    """``size`` images of ``dataset`` drawn at random from ``seed`` (all of it when smaller), in dataset order
    (``zoo.data.sample_indices``, as zoo-eval's ``--limit`` draws them)."""
    if size >= len(dataset):
        return dataset
    return Subset(dataset, sample_indices(len(dataset), size, seed))


@torch.no_grad()
def validate(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Loss and accuracy (top-1/top-5), or mAP for multi-hot labels, over the whole validation set."""
    model.eval()
    all_logits, all_labels = [], []
    for images, target in tqdm(loader, desc="validation", leave=False, disable=not accelerator.is_main_process):
        with checked_inputs():  # decoded 8-bit pixels, finite by construction: no host synchronisation per batch
            logits = model_logits(model, images)
        logits, labels = accelerator.gather_for_metrics((logits, target["label"].to(logits.device)))
        all_logits.append(logits.float())
        all_labels.append(labels)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = {"val_loss": classification_loss(logits, labels).item()}
    return metrics | {f"val_{key}": value for key, value in recognition(logits, labels).items()}


def add_over_processes(accelerator: Accelerator, totals: dict[str, float],
                       sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """``totals`` plus ``sums`` (numbers, or scalars on the device) added over all processes (each has the same
    keys)."""
    values = torch.stack([torch.as_tensor(value, dtype=sum_dtype(accelerator.device), device=accelerator.device)
                          for value in sums.values()])
    added = accelerator.reduce(values, reduction="sum")
    return {key: totals.get(key, 0.0) + value for key, value in zip(sums, added.tolist(), strict=True)}


def _trackers() -> list[str] | None:
    from importlib.util import find_spec

    return ["tensorboard"] if find_spec("tensorboard") or find_spec("tensorboardX") else None


@dataclass
class Run:
    """Everything a run's epochs use, as ``set_up`` built it (model, optimiser and loaders prepared by Accelerate)."""

    recipe: Recipe
    accelerator: Accelerator
    folder: RunFolder
    model: torch.nn.Module
    objective: Classification | GradientDenoising
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    train_loader: DataLoader
    val_loader: DataLoader
    classes: list[str]
    data_config: dict
    progress: Progress
    metrics: MetricsLog


def set_up(recipe: Recipe, overwrite: bool = False, cpu: bool = False) -> Run:
    """The accelerator, data, model, objective, optimiser and schedule of ``recipe``, resumed from the newest
    intact checkpoint of its folder. Nothing is written before all of it is built."""
    folder = RunFolder(recipe, overwrite)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        log_with=_trackers(), project_dir=recipe.output_dir,
    )
    share = accelerator.num_processes * recipe.grad_accum
    if recipe.batch_size % share:
        raise ValueError(f"the global batch {recipe.batch_size} does not split over {accelerator.num_processes} "
                         f"processes x {recipe.grad_accum} accumulation steps")
    folder.check()
    train_set, val_set, classes = build_datasets(recipe)
    set_seed(recipe.seed)
    model = build_model(recipe, len(classes))  # same seed: identical on every process
    overrides = dict(recipe.data_config)
    if recipe.image_size is not None:
        overrides["input_size"] = (3, recipe.image_size, recipe.image_size)
    data_config = resolve_data_config(overrides, model=model)
    train_loader, val_loader = build_loaders(recipe, train_set, val_set, data_config, recipe.batch_size // share,
                                             accelerator.device)
    optimizer = create_optimizer(recipe, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # stepped once per optimiser step of the global batch, so not handed to accelerator.prepare
    scheduler = create_schedule(recipe, optimizer, steps_per_epoch=len(train_loader) // recipe.grad_accum)
    resume_from = folder.prepare(accelerator)  # the first write: the recipe has proved it can start
    progress = Progress()
    if resume_from is not None:
        progress = restore(*resume_from, accelerator, model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from[0]} (epoch {progress.epoch}, batch {progress.batch})")
    if accelerator.is_main_process:
        accelerator.init_trackers(recipe.name)
    return Run(recipe, accelerator, folder, model, build_objective(recipe), optimizer, scheduler, train_loader,
               val_loader, classes, data_config, progress, MetricsLog(folder.path, accelerator, progress.epoch))


def save_checkpoint(run: Run) -> None:
    """The run's full state as the checkpoint of its current step (the ``keep_checkpoints`` newest kept)."""
    files = checkpoint_files(run.accelerator, run.model, run.optimizer, run.scheduler, run.progress)
    run.folder.save_checkpoint(run.accelerator, run.progress.step, run.recipe.keep_checkpoints, files)


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the training sums kept on ``device``: float64, or float32 on Apple's GPUs, which have none."""
    return torch.float32 if device.type == "mps" else torch.float64


def batch_sums(out: StepOutput, labels: torch.Tensor) -> dict[str, float | torch.Tensor]:
    """A batch's images and its sums of the loss, of each logged term and (class indices) of correct answers, as
    scalars left on the device (``sum_dtype``): reading them would make the host wait for the step."""
    count, dtype = len(labels), sum_dtype(labels.device)
    sums = {"images": count, "loss": out.loss.detach().to(dtype) * count,
            **{name: value.detach().to(dtype) * count for name, value in out.terms.items()}}
    if labels.ndim == 1:
        sums["correct"] = (out.logits.argmax(1) == labels).sum().to(dtype)
    return sums


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train epoch ``epoch`` (its rest, when resumed mid-epoch), checkpointing every ``checkpoint_every`` steps;
    its training loss, logged terms and top-1, over the whole epoch and all processes."""
    accelerator, progress, loader = run.accelerator, run.progress, run.train_loader
    loader.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
    run.model.train()
    sums: dict[str, float] = {}  # over this process's images since the last checkpoint (then in progress.sums)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{run.recipe.epochs}", initial=progress.batch, total=len(loader),
               disable=not accelerator.is_main_process)
    shown = -math.inf
    for images, target in bar:
        labels = target["label"].to(accelerator.device)
        # decoded 8-bit pixels, finite by construction: the model skips its check, a host synchronisation per step
        with accelerator.accumulate(run.model), checked_inputs():
            out = run.objective(run.model, images, labels)
            accelerator.backward(out.loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        progress.batch += 1
        sums = {key: sums.get(key, 0.0) + value for key, value in batch_sums(out, labels).items()}
        if time.monotonic() - shown >= POSTFIX_SECONDS:  # reading the terms waits for the step
            bar.set_postfix({name: f"{value.item():.4f}" for name, value in out.terms.items()}
                            | {"lr": f"{run.optimizer.param_groups[0]['lr']:.2e}"})
            shown = time.monotonic()
        if accelerator.sync_gradients:  # an optimiser step of the global batch
            progress.step += 1
            run.scheduler.step_update(progress.step)
            every = run.recipe.checkpoint_every
            if every and progress.step % every == 0 and progress.batch < len(loader):
                progress.sums, sums = add_over_processes(accelerator, progress.sums, sums), {}
                save_checkpoint(run)
    totals = add_over_processes(accelerator, progress.sums, sums)
    images = totals.pop("images")
    metrics = {f"train_{key}": value / images for key, value in totals.items() if key != "correct"}
    if "correct" in totals:
        metrics["train_top1"] = 100 * totals["correct"] / images
    return metrics


def starting_weights(recipe: Recipe) -> dict:
    """What the run loaded before its first step: the recipe's ``weights`` (None: a random initialisation, "default"
    named as the tag it resolves to), the SHA-256 of their safetensors file, their Hub repository (``base_model``)
    and the licence their config records."""
    if recipe.weights is None:
        return dict(weights=None, weights_sha256=None, base_model=None, weights_license=None)
    found = resolve_weights(recipe.model, recipe.weights)
    cfg = found.pretrained_cfg
    named = f"{cfg['architecture']}.{cfg['tag']}" if recipe.weights == "default" else recipe.weights
    return dict(weights=named, weights_sha256=sha256(found.file), base_model=found.hub_repo,
                weights_license=cfg.get("license"))


def run_record(run: Run) -> dict:
    """What the run did, kept in its model's config.json as ``training``: zoo-publish's card says this, not what
    the architecture's default tag declares."""
    recipe, start = run.recipe, starting_weights(run.recipe)
    licence = recipe.license or start["weights_license"] or ("apache-2.0" if recipe.weights is None else "unknown")
    return dict(recipe=recipe.name, dataset=recipe.dataset, classes=len(run.classes),
                train_images=len(run.train_loader.dataset), val_images=len(run.val_loader.dataset),
                image_size=run.data_config["input_size"][-1], epochs=recipe.epochs, steps=run.progress.step,
                objective=recipe.objective, freeze_backbone=recipe.freeze_backbone,
                new_classifier=recipe.new_classifier, **start, license=licence)


def export(run: Run) -> Path:
    """The final weights in timm's Hub layout, ``<output_dir>/model`` (main process), its config.json recording
    the run (``run_record``) in place of the architecture default's tag, licence and notes."""
    model_dir = run.folder.path / "model"
    if run.accelerator.is_main_process:
        record = run_record(run)
        start = "a random initialisation" if record["weights"] is None else f"weights {record['weights']}"
        notes = (f"zoo-train recipe {record['recipe']}: {record['epochs']} epoch(s) on {record['train_images']} "
                 f"{record['dataset']} images of {record['classes']} classes at {record['image_size']} px, from "
                 f"{start}" + (", backbone frozen" if record["freeze_backbone"] else ""),)
        save_for_hf(run.accelerator.unwrap_model(run.model), str(model_dir), safe_serialization=True,
                    model_config=dict(label_names=run.classes, num_classes=len(run.classes), training=record,
                                      pretrained_cfg=dict(license=record["license"], notes=notes)),
                    model_args={key: v for key, v in run.recipe.model_args.items() if key != "num_classes"},
                    data_config={key: run.data_config[key] for key in CONFIG_KEYS})
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        config["pretrained_cfg"].pop("tag", None)  # the architecture's default tag names other weights
        config["weights_sha256"] = sha256(model_dir / WEIGHTS_FILE)  # verified whenever the folder is loaded
        (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return model_dir


def train(recipe: Recipe, overwrite: bool = False, cpu: bool = False) -> Path:
    """Run (or resume) ``recipe``; returns the folder of the final model (``<output_dir>/model``)."""
    run = set_up(recipe, overwrite, cpu)
    for epoch in range(run.progress.epoch, recipe.epochs):
        training = train_one_epoch(run, epoch)
        row = {"epoch": epoch + 1, "step": run.progress.step, "lr": run.optimizer.param_groups[0]["lr"], **training,
               **validate(run.model, run.val_loader, run.accelerator)}
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch + 1}: {row}; lower the lr or check the data")
        run.metrics.write(row)
        run.accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        run.progress.epoch, run.progress.batch, run.progress.sums = epoch + 1, 0, {}
        save_checkpoint(run)
    model_dir = export(run)
    run.folder.finish(run.accelerator, {"epochs": recipe.epochs, "steps": run.progress.step})
    run.accelerator.end_training()
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
