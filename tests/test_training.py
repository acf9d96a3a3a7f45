"""The Accelerate training loop and its recipes, on datasets laid out on disk as the real ones are."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from accelerate.utils import set_seed
from data_layouts import CubImage, make_cub, make_image_folder, make_voc
from safetensors.torch import load_file, save_file

import zoo  # noqa: F401
from zoo.hub import load_model
from zoo.training.config import list_recipes, load_recipe
from zoo.training.optimiser import create_optimizer, create_schedule
from zoo.training.run_folder import finished_model
from zoo.training.train import build_loaders, build_model, subset, train

SMALL_BACKBONE = {"backbone": "resnet10t"}  # the smallest timm ResNet keeps each step fast
QUICK = dict(image_size=32, workers=0, batch_size=4, data_root="")


def stream_recipe(tmp_path, **overrides):
    """CA-Stream (random weights, frozen backbone) on an ImageNet-style folder of 2 x 8 training images."""
    root = tmp_path / "data"
    if not root.exists():
        make_image_folder(root, per_class=8)
    settings = dict(QUICK, model="resnet18_castream", model_args=SMALL_BACKBONE, weights=None, data_root=str(root),
                    epochs=2, output_dir=str(tmp_path / "run"))
    return load_recipe("castream_imagenet", **{**settings, **overrides})


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_recipes_carry_the_thesis_hyperparameters():
    assert list_recipes() == ["castream_cub", "castream_imagenet", "castream_voc", "finetune_cub", "finetune_voc",
                              "gd_cifar100"]
    for name in ("castream_imagenet", "castream_cub", "castream_voc"):  # thesis §3.4
        recipe = load_recipe(name)
        assert recipe.freeze_backbone and recipe.model == "resnet50_castream"
        assert (recipe.lr, recipe.momentum, recipe.weight_decay, recipe.epochs, recipe.batch_size) == \
               (0.1, 0.9, 1e-4, 90, 256)
        assert (recipe.milestones, recipe.gamma) == ([30, 60], 0.1)
    assert load_recipe("castream_cub").weights == "runs/finetune_cub/model"
    for name, dataset in (("finetune_cub", "cub"), ("finetune_voc", "voc")):
        recipe = load_recipe(name)
        assert recipe.new_classifier and recipe.weights == "timm/resnet50.tv_in1k" and recipe.dataset == dataset
    gd = load_recipe("gd_cifar100")  # thesis ch. 4 and the CIFAR-100 protocol it follows
    assert (gd.objective, gd.gd_error, gd.gd_weight) == ("gradient_denoising", "cosine", 7.5e-3)
    assert (gd.epochs, gd.lr, gd.momentum, gd.weight_decay, gd.batch_size, gd.warmup_epochs) == \
           (200, 0.1, 0.9, 5e-4, 128, 1)
    assert (gd.milestones, gd.gamma, gd.augmentation) == ([60, 120, 160], 0.2, "cifar")
    for name in list_recipes():  # SGD with classical momentum, the recipes' step decay
        recipe = load_recipe(name)
        assert (recipe.optimizer, recipe.optimizer_args, recipe.schedule, recipe.schedule_args) == \
               ("momentum", {}, "milestones", {})


@pytest.mark.parametrize("args, message", [
    (("no_such_recipe",), "unknown recipe 'no_such_recipe'"),
    (("castream_cub",), "unknown settings learning_rate"),
    (("castream_cub",), "dataset 'imagenet' is not one of"),
    (("castream_cub",), "epochs must be at least 1"),
    (("castream_cub",), "objective 'distillation' is not one of"),
])
def test_recipe_errors_name_the_setting(args, message):
    overrides = {"unknown settings learning_rate": dict(learning_rate=0.1), "dataset 'imagenet' is not one of":
                 dict(dataset="imagenet"), "epochs must be at least 1": dict(epochs=0),
                 "objective 'distillation' is not one of": dict(objective="distillation")}.get(message, {})
    with pytest.raises(ValueError, match=message):
        load_recipe(*args, **overrides)


def test_recipe_schedule_gives_the_lr_of_every_step_as_before():
    """The lr of each optimiser step, from timm's scheduler interface, is the one the recipes always had
    (``reference``, the former LambdaLR factor), to the last bit."""
    steps_per_epoch = 10

    def reference(recipe, step):  # linear warm-up, then x gamma at each milestone epoch
        warmup = recipe.warmup_epochs * steps_per_epoch
        decay = recipe.gamma ** sum(step >= milestone * steps_per_epoch for milestone in recipe.milestones)
        return recipe.lr * (decay * min(1.0, (step + 1) / warmup) if warmup else decay)

    for recipe in (load_recipe("castream_imagenet"), load_recipe("finetune_cub"), load_recipe("gd_cifar100")):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
        scheduler = create_schedule(recipe, optimizer, steps_per_epoch)
        lrs = [optimizer.param_groups[0]["lr"]]
        for step in range(1, recipe.epochs * steps_per_epoch):
            scheduler.step_update(step)
            lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs == [reference(recipe, step) for step in range(recipe.epochs * steps_per_epoch)]
    # the last, gd_cifar100: warm-up over the first epoch, x0.2 at 60, 120, 160
    assert [lrs[s] / 0.1 for s in (0, 4, 9, 599, 600, 1200, 1600, 1999)] == \
           pytest.approx([0.1, 0.5, 1, 1, 0.2, 0.04, 0.008, 0.008])


@pytest.mark.parametrize("model_name, args", [("resnet18_castream", SMALL_BACKBONE), ("resnet10t", {})])
def test_recipe_optimizer_is_torchs_sgd_over_the_trainable_parameters(model_name, args):
    """timm's factory gives the recipes' SGD: classical momentum (not Nesterov), weight decay on biases and norms
    too, one parameter group of the trainable parameters: the same weights, bit for bit, after a few steps."""
    recipe = load_recipe("castream_imagenet", model=model_name, model_args=args, freeze_backbone=bool(args),
                         weight_decay=1e-2)
    torch.manual_seed(0)
    models = [build_model(dataclasses.replace(recipe, weights=None), 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    trainable = [p for p in models[1].parameters() if p.requires_grad]
    optimizers = [create_optimizer(recipe, models[0]),
                  torch.optim.SGD(trainable, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)]
    ours, theirs = (optimizer.param_groups for optimizer in optimizers)
    assert type(optimizers[0]) is torch.optim.SGD and len(ours) == len(theirs) == 1
    assert [p.shape for p in ours[0]["params"]] == [p.shape for p in trainable]
    assert {k: v for k, v in ours[0].items() if k != "params"} == {k: v for k, v in theirs[0].items() if k != "params"}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for model, optimizer in zip(models, optimizers, strict=True):
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x)[0] if args else model(x), y).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in models), strict=True))


class Killed(Exception):
    """Stands for a kill at a chosen optimiser step."""


def test_a_recipe_names_another_timm_optimizer_and_schedule(tmp_path, monkeypatch):
    """AdamW with timm's no weight decay on biases and norms, and a cosine schedule, by recipe fields alone: a short
    run trains with them, its lr follows timm's cosine per optimiser step, and a run killed mid-epoch resumes
    (timm's scheduler state read back as plain data) to the same weights."""
    settings = dict(optimizer="adamw", optimizer_args={"betas": [0.9, 0.99], "filter_bias_and_bn": True}, lr=1e-3,
                    weight_decay=0.05, schedule="cosine", schedule_args={"min_lr": 1e-5}, checkpoint_every=1)
    whole = train(stream_recipe(tmp_path, output_dir=str(tmp_path / "whole"), **settings), cpu=True)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # 4 optimiser steps an epoch, 8 in all: half-way down the cosine after epoch 1, at its floor after epoch 2
    assert [row["lr"] for row in rows] == pytest.approx([1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 2)) / 2, 1e-5])
    last = sorted((tmp_path / "whole" / "checkpoints").glob("step-*"))[-1]
    optimizer = torch.load(last / "state.pt", weights_only=True)["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= optimizer["state"][0].keys()
    assert [(group["weight_decay"], tuple(group["betas"])) for group in optimizer["param_groups"]] == \
           [(0.0, (0.9, 0.99)), (0.05, (0.9, 0.99))]  # biases and the query undecayed
    assert not torch.equal(state(whole)["stream.query"], build_model(stream_recipe(tmp_path), 2).state_dict()[
        "stream.query"])

    calls, adamw_step = [], torch.optim.AdamW.step

    def killed_at_step_6(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 6:
            raise Killed
        return adamw_step(self, *args, **kwargs)

    recipe = stream_recipe(tmp_path, output_dir=str(tmp_path / "killed"), **settings)
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", killed_at_step_6)
        with pytest.raises(Killed):
            train(recipe, cpu=True)
    resumed = train(recipe, cpu=True)
    assert all(torch.equal(value, state(resumed)[key]) for key, value in state(whole).items())


def test_limit_draws_a_fixed_subset_across_a_dataset_stored_class_by_class():
    labels = [0] * 50 + [1] * 50
    chosen = subset(labels, 10, seed=0)
    assert list(chosen.indices) == sorted(chosen.indices) and len(set(chosen.indices)) == 10
    assert {labels[i] for i in chosen.indices} == {0, 1}
    assert list(subset(labels, 10, seed=0).indices) == list(chosen.indices) != list(subset(labels, 10, 1).indices)
    assert subset(labels, 500, seed=0) is labels


class Numbers(torch.utils.data.Dataset):
    """Images that are their own index, and a ``transforms`` slot as the real datasets have."""

    transforms = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.full((3, 2, 2), float(index)), index


@pytest.mark.parametrize("limit, val_limit, sizes", [(None, None, (40, 30)), (8, None, (8, 8)), (8, 20, (8, 20)),
                                                     (None, 5, (40, 5))])
def test_val_limit_sets_the_validation_subset_on_its_own(tmp_path, limit, val_limit, sizes):
    recipe = stream_recipe(tmp_path, limit=limit, val_limit=val_limit)
    data_config = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t"))
    loaders = build_loaders(recipe, Numbers(40), Numbers(30), data_config, 4, torch.device("cpu"))
    assert tuple(len(loader.dataset) for loader in loaders) == sizes
    with pytest.raises(ValueError, match="val_limit must be at least 1"):
        stream_recipe(tmp_path, val_limit=0)


def test_stream_recipe_trains_the_stream_only_and_saves_a_timm_model(tmp_path):
    recipe = stream_recipe(tmp_path)
    model_dir = train(recipe, cpu=True)
    set_seed(recipe.seed)
    start = build_model(recipe, 2).state_dict()
    final = state(model_dir)
    moved = {k for k in final if not torch.equal(final[k], start[k])}
    assert moved and all(k.startswith("stream.") for k in moved)  # the frozen backbone, BatchNorm included, kept
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all({"train_loss", "val_loss", "val_top1"} <= r.keys()
                                                        for r in rows)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    loaded = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    assert loaded.pretrained_cfg["label_names"] == ["n01440764", "n01443537"]
    reference = load_model("resnet18_castream", str(model_dir), 2, **SMALL_BACKBONE).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), reference(x), strict=True))


def test_cub_fine_tuning_then_stream_on_top_keeps_the_fine_tuned_classifier(tmp_path):
    images = tuple(CubImage(1 + i % 3, i % 4 != 0, (8, 8, 40, 30)) for i in range(12))
    make_cub(tmp_path / "data", images=images)
    imagenet = tmp_path / "resnet10t_in1k.safetensors"  # stands for timm's ImageNet weights
    save_file(timm.create_model("resnet10t").state_dict(), imagenet)
    common = dict(QUICK, data_root=str(tmp_path / "data"), epochs=1, batch_size=3)
    baseline = train(load_recipe("finetune_cub", model="resnet10t", weights=str(imagenet), lr=0.01,
                                 output_dir=str(tmp_path / "gap"), **common), cpu=True)
    tuned = state(baseline)
    assert tuned["fc.weight"].shape == (3, 512)
    assert not torch.equal(tuned["conv1.0.weight"], load_file(imagenet)["conv1.0.weight"])
    stream = train(load_recipe("castream_cub", model="resnet18_castream", model_args=SMALL_BACKBONE,
                               weights=str(baseline), output_dir=str(tmp_path / "ca"), **common), cpu=True)
    final = state(stream)
    assert all(torch.equal(final[f"backbone.{k}"], v) for k, v in tuned.items())  # classifier included
    config = json.loads((stream / "config.json").read_text())
    assert config["architecture"] == "resnet18_castream" and config["num_classes"] == 3
    assert config["label_names"] == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert config["model_args"]["backbone"] == "resnet10t"


def test_voc_is_multi_label_with_binary_cross_entropy_and_map(tmp_path):
    make_voc(tmp_path / "data")
    recipe = load_recipe("finetune_voc", model="resnet10t", weights=None, new_classifier=False, epochs=1,
                         output_dir=str(tmp_path / "run"), **dict(QUICK, batch_size=2,
                                                                  data_root=str(tmp_path / "data")))
    train(recipe, cpu=True)
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= row["val_mAP"] <= 100 and "val_top1" not in row and "train_top1" not in row


def _train_command(tmp_path, out: str, decode: str) -> list[str]:
    return [sys.executable, "-m", "zoo.training.train", "castream_imagenet", "--model", "resnet18_castream",
            "--set", f"model_args={json.dumps(SMALL_BACKBONE)}", "--set", f"decode={decode}", "--weights", "none",
            "--data-root", str(tmp_path / "data"), "--image-size", "32", "--workers", "0", "--batch-size", "4",
            "--epochs", "2", "--checkpoint-every", "1", "--output-dir", str(tmp_path / out), "--cpu"]


@pytest.mark.parametrize("decode", ["workers", "device"])  # zoo.data.device: JPEGs decoded as batches move there
def test_a_killed_run_resumes_mid_epoch_and_ends_with_the_uninterrupted_weights(tmp_path, decode):
    make_image_folder(tmp_path / "data", per_class=8)
    subprocess.run(_train_command(tmp_path, "whole", decode), check=True, cwd=tmp_path, capture_output=True)
    killed = subprocess.Popen(_train_command(tmp_path, "killed", decode), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-*")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["state"] == "running", \
        "the run finished before it could be killed"
    resumed = subprocess.run(_train_command(tmp_path, "killed", decode), check=True, cwd=tmp_path, capture_output=True,
                             text=True)
    position = resumed.stdout[resumed.stdout.index("resumed from"):].split("\n")[0]
    assert "batch 0)" not in position, f"expected a resume in the middle of an epoch: {position}"
    whole, again = state(tmp_path / "whole" / "model"), state(tmp_path / "killed" / "model")
    assert all(torch.allclose(whole[k].float(), again[k].float(), atol=1e-6) for k in whole)
    assert not list(checkpoints.glob(".partial*"))


def test_two_processes_see_disjoint_data_and_end_with_identical_weights(tmp_path):
    make_image_folder(tmp_path / "data", per_class=8)
    args = ["castream_imagenet", "--model", "resnet18_castream", "--set", f"model_args={json.dumps(SMALL_BACKBONE)}",
            "--weights", "none", "--data-root", str(tmp_path / "data"), "--image-size", "32", "--workers", "0",
            "--batch-size", "4", "--epochs", "2"]
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    str(Path(__file__).parent / "launch_training.py"), str(tmp_path), *args, "--output-dir",
                    str(tmp_path / "two"), "--cpu"], check=True, cwd=tmp_path, capture_output=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        first, second = set(seen[0][epoch]), set(seen[1][epoch])
        assert not first & second and first | second == set(range(16))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # the frozen backbone has no batch statistics to split: 2 x 2 images per step is the same step as 1 x 4
    single = state(train(stream_recipe(tmp_path, output_dir=str(tmp_path / "one")), cpu=True))
    assert all(torch.allclose(single[k], ranks[0][k], atol=1e-5) for k in single)


def test_finished_or_foreign_runs_are_never_overwritten(tmp_path):
    recipe = stream_recipe(tmp_path, epochs=1)
    assert finished_model(recipe) is None
    train(recipe, cpu=True)
    with pytest.raises(FileExistsError, match="holds a finished run; --overwrite replaces it"):
        train(recipe, cpu=True)
    # reused as it is by the demo and the experiments, but only for the recipe it ran
    assert finished_model(dataclasses.replace(recipe, workers=3)) == tmp_path / "run" / "model"
    with pytest.raises(FileExistsError, match="holds a finished run of another recipe .*lr: 0.1 -> 0.05"):
        finished_model(stream_recipe(tmp_path, epochs=1, lr=0.05))
    status = tmp_path / "run" / "status.json"
    status.write_text(json.dumps({"state": "running"}))
    with pytest.raises(FileExistsError, match="another recipe .*lr: 0.1 -> 0.05"):
        train(stream_recipe(tmp_path, epochs=1, lr=0.05), cpu=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and holds no run"):
        train(stream_recipe(tmp_path, epochs=1, output_dir=str(tmp_path / "other")), cpu=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    train(stream_recipe(tmp_path, epochs=1, lr=0.05), overwrite=True, cpu=True)
    assert json.loads(status.read_text())["state"] == "finished"


def test_bad_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="sets num_classes=5 but imagenet-folder has 2 classes"):
        train(stream_recipe(tmp_path, model_args=dict(SMALL_BACKBONE, num_classes=5)), cpu=True)
    other = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", num_classes=2).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit resnet18_castream"):
        train(stream_recipe(tmp_path, weights=str(other), model_args={}), cpu=True)
    with pytest.raises(ValueError, match="does not split over 1 processes x 2 accumulation steps"):
        train(stream_recipe(tmp_path, batch_size=5, grad_accum=2), cpu=True)
    with pytest.raises(ValueError, match="resnet10t has no separate backbone to freeze"):
        train(stream_recipe(tmp_path, model="resnet10t", model_args={}), cpu=True)
    with pytest.raises(FileNotFoundError, match="missing.safetensors not found"):
        train(stream_recipe(tmp_path, weights=str(tmp_path / "missing.safetensors")), cpu=True)
    broken = next((tmp_path / "data" / "train").rglob("*.JPEG"))
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
    with pytest.raises(OSError, match=f"could not decode the image {broken}"):
        train(stream_recipe(tmp_path, output_dir=str(tmp_path / "broken")), cpu=True)


def test_gradient_denoising_recipe_logs_both_terms_and_its_baseline_trains_plainly(tmp_path):
    make_image_folder(tmp_path / "data", per_class=4)
    common = dict(QUICK, dataset="imagenet-folder", data_root=str(tmp_path / "data"), val_split="val", epochs=1)
    denoised = load_recipe("gd_cifar100", output_dir=str(tmp_path / "gd"), **common)
    train(denoised, cpu=True)
    (row,) = [json.loads(line) for line in (tmp_path / "gd" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_classification", "train_regulariser", "train_top1", "val_top1"} <= row.keys()
    assert -1 <= row["train_regulariser"] <= 1  # the cosine error of eq. 4.7
    assert row["train_loss"] == pytest.approx(row["train_classification"] + 7.5e-3 * row["train_regulariser"])
    train(load_recipe("gd_cifar100", gd_weight=0, output_dir=str(tmp_path / "base"), **common), cpu=True)
    (row,) = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert "train_regulariser" not in row and row["train_loss"] == pytest.approx(row["train_classification"])
    assert json.loads((tmp_path / "gd" / "model" / "config.json").read_text())["architecture"] == "resnet18_cifar"
    with pytest.raises(ValueError, match="use mixed_precision bf16 or no"):
        load_recipe("gd_cifar100", mixed_precision="fp16")
