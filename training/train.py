"""The training loop of every recipe, on Hugging Face Accelerate: CPU, one GPU, many GPUs or nodes alike.

    zoo-train castream_cub --data-root data/CUB_200_2011 --epochs 1 --limit 256
    accelerate launch --multi_gpu --num_processes 8 -m training.train castream_imagenet

A run lives in its output folder (``runs/<recipe>`` by default):

- ``recipe.json``: the recipe it runs; ``status.json``: ``running`` or ``finished``;
- ``checkpoints/step-<N>/``: the full state (weights as safetensors; optimiser, scheduler, RNG and data position
  as Accelerate saves them), written to a temporary folder first, so a killed run never leaves a partial one;
- ``metrics.csv`` and ``metrics.jsonl``: per-epoch training loss and validation metrics (and TensorBoard when
  it is installed);
- ``model/``: the final weights in timm's Hub layout (``model.safetensors`` + ``config.json`` with the label
  names), which ``timm.create_model("local-dir:<run>/model", pretrained=True)`` loads.

Starting a recipe again in the same folder resumes from its last checkpoint and ends with the weights the
uninterrupted run gives: the data order is drawn from (seed, epoch) and each image's augmentation from
(seed, epoch, index), whatever the number of processes or data-loading workers. A folder that holds a
finished run, or a run of another recipe, is never overwritten without ``--overwrite``.

Checkpoints hold Accelerate's pickled optimiser and RNG state: resume only from your own runs. Published
weights (``model/``) are safetensors.
"""

import argparse
import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import resolve_data_config
from timm.models import save_for_hf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import zoo  # noqa: F401  (registers the zoo's models)
from evaluation.metrics import mean_average_precision, top_k_accuracy
from zoo.data import build_dataset, collate
from zoo.data.transforms import eval_transform, train_transform
from zoo.hub import load_model

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
    """Where the run is: saved with every checkpoint."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimiser steps done

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, batch=self.batch, step=self.step)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]


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
    if labels.ndim == 2:
        metrics["val_map"] = mean_average_precision(logits, labels).item()
    else:
        ks = [k for k in (1, 5) if k <= logits.shape[1]]
        hits = top_k_accuracy(logits, labels, ks).mean(0)
        metrics.update({f"val_top{k}": hit.item() for k, hit in zip(ks, hits, strict=True)})
    return metrics


class RunFolder:
    """The output folder: refuses to overwrite, finds the checkpoint to resume, writes checkpoints atomically."""

    def __init__(self, recipe: Recipe, overwrite: bool):
        self.path = Path(recipe.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.recipe = recipe.to_dict()
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse a folder that holds something else than an unfinished run of this recipe (unless overwriting)."""
        stored = self.path / "recipe.json"
        if self.overwrite or not self.path.exists() or not any(self.path.iterdir()):
            return
        if not stored.exists():
            raise FileExistsError(f"{self.path} is not empty and holds no run: choose another output_dir, "
                                  "or --overwrite to replace its contents")
        if json.loads((self.path / "status.json").read_text()).get("state") == "finished":
            raise FileExistsError(f"{self.path} holds a finished run; --overwrite replaces it")
        differences = {key: (value, self.recipe.get(key)) for key, value in json.loads(stored.read_text()).items()
                       if key not in ("workers", "output_dir") and self.recipe.get(key) != value}
        if differences:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
            raise FileExistsError(f"{self.path} holds an unfinished run of another recipe ({listed}); "
                                  "--overwrite replaces it, or choose another output_dir")

    def prepare(self, accelerator: Accelerator) -> Path | None:
        """Set the folder up (main process); the checkpoint to resume from, if any."""
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.overwrite and self.path.exists():
                shutil.rmtree(self.path)
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.json").write_text(json.dumps(self.recipe, indent=2))
            (self.path / "status.json").write_text(json.dumps({"state": "running"}))
        accelerator.wait_for_everyone()
        finished = sorted(self.checkpoints.glob("step-*"))
        return finished[-1] if finished else None

    def save_checkpoint(self, accelerator: Accelerator, step: int, keep: int) -> None:
        partial = self.checkpoints / f".partial-step-{step:08d}"
        if accelerator.is_main_process:
            partial.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()  # every process writes its RNG state into it
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            target = self.checkpoints / f"step-{step:08d}"
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
            for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def finish(self, accelerator: Accelerator, summary: dict) -> None:
        if accelerator.is_main_process:
            (self.path / "status.json").write_text(json.dumps({"state": "finished", **summary}, indent=2))


class MetricsLog:
    """Per-epoch metrics to ``metrics.csv`` and ``metrics.jsonl`` (main process), and Accelerate's trackers."""

    def __init__(self, folder: Path, accelerator: Accelerator):
        self.folder, self.accelerator = folder, accelerator

    def write(self, row: dict) -> None:
        self.accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        if not self.accelerator.is_main_process:
            return
        with (self.folder / "metrics.jsonl").open("a") as file:
            file.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in (self.folder / "metrics.jsonl").read_text().splitlines()]
        columns = list(dict.fromkeys(key for r in rows for key in r))
        with (self.folder / "metrics.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows(rows)


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
    resume_from = run.prepare(accelerator)  # once the recipe has proved it can start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader) // recipe.grad_accum
    # stepped once per optimiser step of the global batch, so not handed to accelerator.prepare
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_schedule(recipe, steps_per_epoch))
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} (epoch {progress.epoch}, batch {progress.batch})")
    if accelerator.is_main_process:
        accelerator.init_trackers(recipe.name)
    log = MetricsLog(run.path, accelerator)
    objective = build_objective(recipe)

    for epoch in range(progress.epoch, recipe.epochs):
        train_loader.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, progress.batch) if progress.batch else train_loader
        model.train()
        sums: dict[str, float] = {}  # over this process's images of the epoch (since the resume, if any)
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
                    run.save_checkpoint(accelerator, progress.step, recipe.keep_checkpoints)
        totals = dict(zip(sums, accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device),
                                                   reduction="sum").tolist(), strict=True))
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
        progress.epoch, progress.batch = epoch + 1, 0
        run.save_checkpoint(accelerator, progress.step, recipe.keep_checkpoints)

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
