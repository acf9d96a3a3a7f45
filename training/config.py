"""Training recipes: a dataclass of every setting, filled from a small YAML file and command-line overrides.

The recipes of the thesis live in ``training/recipes/<name>.yaml`` with its hyperparameters written in them
(thesis §3.4 for CA-Stream, ch. 4 for gradient denoising); ``load_recipe("finetune_cub", epochs=1, limit=64)`` or
``zoo-train finetune_cub --epochs 1`` reads one and overrides fields.
"""

import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from timm.optim import list_optimizers

from zoo.data import DATASETS
from zoo.data.device import DECODERS
from zoo.data.transforms import AUGMENTATIONS

from .gradient_denoising import ERRORS
from .optimiser import SCHEDULES, optimizer_options, schedule_options

__all__ = ["RECIPES_DIR", "Recipe", "list_recipes", "load_recipe"]

RECIPES_DIR = Path(__file__).parent / "recipes"
OBJECTIVES = ("classification", "gradient_denoising")
PRECISIONS = ("no", "fp16", "bf16")
KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "text", type(None): "null",
         dict: "a mapping of names to JSON values", list[int]: "a list of integers"}  # as recipe messages name them
NUMBER_AS_TEXT = re.compile(r"[-+]?[0-9_.]+[eE][-+]?[0-9]+")  # e.g. 1e-4, which YAML 1.1 (PyYAML) reads as text


def is_of_kind(value, kind) -> bool:
    """Whether ``value`` is of the declared type ``kind`` taken strictly: a bool is not an integer, an integer is
    a number, a number is finite, a mapping's keys are names and its values JSON."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(is_of_kind(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(is_of_kind(item, typing.get_args(kind)[0]) for item in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value) and is_json(value)
    return isinstance(value, kind)


def is_json(value) -> bool:
    """Whether ``value`` can be written to recipe.json as it is."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def kind_problem(name: str, value, kind) -> str:
    """The message for ``value`` of setting ``name`` not being of ``kind``."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    problem = f"{name} must be {' or '.join(KINDS[option] for option in options)}, got {value!r}"
    if float in options and isinstance(value, str) and NUMBER_AS_TEXT.fullmatch(value):
        problem += (" (YAML reads a number in exponent notation as text unless it has a decimal point and a signed "
                    "exponent: write 1.0e-4 or 2.0e+3)")
    return problem


@dataclass
class Recipe:
    """Every setting of a training run. ``batch_size`` is global: each of N processes with gradient
    accumulation A takes ``batch_size / (N * A)`` images per step, so the optimisation is the same on any
    hardware."""

    name: str
    model: str  # a registered timm/zoo architecture
    dataset: str  # a name of zoo.data.DATASETS
    data_root: str
    model_args: dict = field(default_factory=dict)  # passed to timm.create_model
    # initial weights, any name zoo.hub.resolve_weights takes (local-dir:, hf-hub:, arch.tag, "default", a folder,
    # org/name, a .safetensors file); None or "none": random
    weights: str | None = None
    new_classifier: bool = False  # the weights' classifier is replaced (fine-tuning on another label set)
    freeze_backbone: bool = False  # CA-Stream, SimPool: train the pooling only (thesis §3.3)
    # of the weights the run exports; default: the one the starting weights' config.json records, apache-2.0 (the
    # project's) from a random initialisation, "unknown" from weights that record none
    license: str | None = None
    train_split: str = "train"
    val_split: str | None = None  # default: the dataset's other split
    dataset_options: dict = field(default_factory=dict)
    image_size: int | None = None  # default: the model's data config
    data_config: dict = field(default_factory=dict)  # other overrides of it, e.g. {"crop_pct": 1.0}
    augmentation: str = "imagenet"
    # where images are decoded and augmented: "workers" (the DataLoader's processes, on the CPU), "device" (JPEG files
    # decoded and augmented on the training device, nvJPEG on a GPU), "auto" (device on a GPU when the dataset is read
    # from image files and the augmentation can run there, workers otherwise); zoo.data.device.decoding_transforms
    decode: str = "auto"
    objective: str = "classification"
    gd_error: str = "cosine"  # gradient denoising (thesis ch. 4): error function E, eq. 4.5-4.8
    gd_weight: float = 7.5e-3  # and lambda, eq. 4.4
    epochs: int = 90
    batch_size: int = 256
    optimizer: str = "momentum"  # a timm optimiser; "momentum": SGD with classical momentum (timm's "sgd" is Nesterov)
    optimizer_args: dict = field(default_factory=dict)  # more options of timm's create_optimizer_v2 and the optimiser
    lr: float = 0.1
    momentum: float = 0.9  # for optimisers with momentum
    weight_decay: float = 1e-4
    schedule: str = "milestones"  # the lr x gamma at each milestone, or a timm schedule: cosine, step, ...
    schedule_args: dict = field(default_factory=dict)  # more options of timm's create_scheduler_v2 (not milestones)
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # epochs where the lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up of the lr over the first epochs, per step
    mixed_precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    workers: int = 4
    limit: int | None = None  # a fixed random subset of N images of each split (quick runs)
    val_limit: int | None = None  # validate on a fixed random subset of N images (default: limit)
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps (0: at the end of each epoch only)
    keep_checkpoints: int = 2
    output_dir: str | None = None  # default: runs/<name>

    def __post_init__(self):
        problems = [kind_problem(f.name, getattr(self, f.name), f.type) for f in fields(self)
                    if not is_of_kind(getattr(self, f.name), f.type)]
        if problems:  # before the range checks, which compare the values
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))
        if self.dataset not in DATASETS:
            problems.append(f"dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.augmentation not in AUGMENTATIONS:
            problems.append(f"augmentation {self.augmentation!r} is not one of {', '.join(AUGMENTATIONS)}")
        if self.decode not in DECODERS:
            problems.append(f"decode {self.decode!r} is not one of {', '.join(DECODERS)}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.mixed_precision not in PRECISIONS:
            problems.append(f"mixed_precision {self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gd_error not in ERRORS:
            problems.append(f"gd_error {self.gd_error!r} is not one of {', '.join(ERRORS)}")
        problems += self.optimisation_problems()
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "checkpoint_every", "gd_weight", "gamma",
                     "workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if any(milestone < 0 for milestone in self.milestones):
            problems.append(f"milestones must not be negative, got {self.milestones}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.objective == "gradient_denoising" and self.mixed_precision == "fp16" and self.gd_weight:
            problems.append("gradient denoising differentiates input gradients that fp16 loss scaling does not "
                            "reach (they may underflow): use mixed_precision bf16 or no")
        for name in ("limit", "val_limit", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))
        if self.weights in ("none", ""):  # the command line's way to ask for a random initialisation
            self.weights = None
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)

    def optimisation_problems(self) -> list[str]:
        """What is wrong with the names and options of the optimiser and the schedule."""
        problems = []
        if self.optimizer not in list_optimizers():
            problems.append(f"optimizer {self.optimizer!r} is not one of timm's optimisers (e.g. momentum, sgd, "
                            "adamw; timm.optim.list_optimizers() lists them)")
        elif (known := optimizer_options(self.optimizer)) is not None and self.optimizer_args.keys() - known:
            unknown = ", ".join(sorted(self.optimizer_args.keys() - known))
            problems.append(f"optimizer_args {self.optimizer_args!r}: {self.optimizer} takes no {unknown} (it takes "
                            f"{', '.join(sorted(known))})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        elif self.schedule == "milestones" and self.schedule_args:
            problems.append(f"schedule_args {self.schedule_args!r}: the milestones schedule takes none (timm's do)")
        elif self.schedule_args.keys() - schedule_options():
            problems.append(f"schedule_args {self.schedule_args!r}: timm's schedules take no "
                            f"{', '.join(sorted(self.schedule_args.keys() - schedule_options()))} (they take "
                            f"{', '.join(sorted(schedule_options()))})")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)


def list_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, **overrides) -> Recipe:
    """The recipe ``training/recipes/<name>.yaml`` (or a YAML file's path) with ``overrides`` applied."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}: known recipes are {', '.join(list_recipes())} "
                             "(or give a YAML file's path)")
    elif not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found")
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: a recipe is a mapping of settings, got {type(settings).__name__}")
    known = {f.name for f in fields(Recipe)}
    unknown = sorted((settings.keys() | overrides.keys()) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings.setdefault("name", path.stem)
    try:
        return Recipe(**{**settings, **overrides})
    except TypeError as error:  # a required setting missing
        raise ValueError(f"{path}: {error}") from None
