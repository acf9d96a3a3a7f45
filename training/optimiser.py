"""A recipe's optimiser and learning-rate schedule, through timm's factories.

``optimizer`` names any of timm's optimisers (``timm.optim.list_optimizers()``), built by
``timm.optim.create_optimizer_v2``. The recipes' ``momentum`` is ``torch.optim.SGD`` with classical momentum
(timm's ``sgd`` is Nesterov's) with weight decay on every trainable parameter, biases and norms included (timm's
``filter_bias_and_bn`` is off unless ``optimizer_args`` turns it on): the same optimiser, parameter group and
steps as ``torch.optim.SGD(trainable, lr, momentum=momentum, weight_decay=weight_decay)``.

``schedule`` is ``milestones``, the recipes' own, or one of timm's schedules built by
``timm.scheduler.create_scheduler_v2``. Every schedule is stepped once per optimiser step of the global batch
(``step_update``): the lr moves within an epoch, the same way on any number of processes.

``milestones`` is not timm's ``multistep``: per update, timm lowers the lr at the last update of milestone epoch
m instead of the first update after it (its documented convention), and its warm-up starts from ``warmup_lr``
and reaches the lr one update later than ours, which starts at lr / W and reaches the lr at the W-th of W
warm-up steps. ``MilestoneSchedule`` is a timm ``Scheduler`` that gives the recipes' lr exactly.
"""

import inspect
from typing import TYPE_CHECKING

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from .config import Recipe

__all__ = ["SCHEDULES", "MilestoneSchedule", "create_optimizer", "create_schedule", "optimizer_options",
           "schedule_options"]

SCHEDULES = ("milestones", "cosine", "tanh", "step", "multistep", "poly")  # timm's, less the per-epoch plateau
# what the recipe's own fields give the factories, so not options of optimizer_args / schedule_args
OPTIMIZER_FIELDS = {"model_or_params", "params", "opt", "lr", "weight_decay", "momentum"}
SCHEDULE_FIELDS = {"optimizer", "sched", "num_epochs", "decay_milestones", "decay_rate", "warmup_epochs",
                   "step_on_epochs", "updates_per_epoch"}


def _named(function) -> set[str]:
    """The names of the arguments ``function`` takes one by one."""
    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def optimizer_options(name: str) -> set[str] | None:
    """What ``optimizer_args`` may set for timm's optimiser ``name``: create_optimizer_v2's options and the
    optimiser's own; None when the optimiser takes any keyword."""
    optimizer = get_optimizer_class(name, bind_defaults=False)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(optimizer).parameters.values()):
        return None
    return (_named(create_optimizer_v2) | _named(optimizer)) - OPTIMIZER_FIELDS


def schedule_options() -> set[str]:
    """What ``schedule_args`` may set: create_scheduler_v2's options."""
    return _named(create_scheduler_v2) - SCHEDULE_FIELDS


def create_optimizer(recipe: "Recipe", model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimiser ``recipe.optimizer`` over the trainable parameters of ``model``."""
    return create_optimizer_v2(model, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=recipe.momentum, **{"filter_bias_and_bn": False, **recipe.optimizer_args})


class MilestoneSchedule(Scheduler):
    """The recipes' schedule, in optimiser steps: linear warm-up from lr / ``warmup`` to lr over the first
    ``warmup`` steps, and lr x ``gamma`` from each step in ``milestones`` on. State: numbers only."""

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float, warmup: int):
        self.milestones, self.gamma, self.warmup = milestones, gamma, warmup
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.step_update(0)

    def _get_lr(self, t: int) -> list[float]:
        decay = self.gamma ** sum(t >= milestone for milestone in self.milestones)
        factor = decay * min(1.0, (t + 1) / self.warmup) if self.warmup else decay
        return [base * factor for base in self.base_values]


def create_schedule(recipe: "Recipe", optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """The schedule ``recipe.schedule``, to be stepped by ``step_update(steps done)`` after every optimiser step."""
    if recipe.schedule == "milestones":
        return MilestoneSchedule(optimizer, [m * steps_per_epoch for m in recipe.milestones], recipe.gamma,
                                 recipe.warmup_epochs * steps_per_epoch)
    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.schedule, num_epochs=recipe.epochs,
                                       decay_milestones=recipe.milestones, decay_rate=recipe.gamma,
                                       warmup_epochs=recipe.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch, **recipe.schedule_args)
    return scheduler
