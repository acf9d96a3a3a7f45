"""Faults the training loop must survive without losing or corrupting anything: damaged checkpoints, a full
disk, a kill between an epoch's metrics row and its checkpoint, pickles planted in a checkpoint, and recipe
values of the wrong type or range (the bad-input tables)."""

import builtins
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate.utils.other
import psutil
import pytest
import safetensors
import safetensors.torch
import torch
from data_layouts import CubImage, make_cub, make_image_folder
from test_training import QUICK, SMALL_BACKBONE, state

import zoo.training.run_folder
import zoo.training.train
from zoo.training.config import load_recipe
from zoo.training.train import train

STEPS_PER_EPOCH = 4  # 16 training images, batch 4


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point of the run."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", per_class=8)


def stream_run(data: Path, out: Path, **overrides):
    """The CA-Stream recipe of tests/test_training.py, 2 epochs of 4 steps, checkpointed after every step."""
    settings = dict(QUICK, model="resnet18_castream", model_args=SMALL_BACKBONE, weights=None, data_root=str(data),
                    epochs=2, checkpoint_every=1, output_dir=str(out))
    return load_recipe("castream_imagenet", **{**settings, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """The folder of the run nothing interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(stream_run(data, out), cpu=True)
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(run: Path, reference: Path) -> None:
    for row, expected in zip(rows(run), rows(reference), strict=True):
        assert row.keys() == expected.keys()
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-6)


def kill_at_step(monkeypatch, recipe, step: int) -> None:
    """Run ``recipe`` until its ``step``-th optimiser step (1-based), which never happens."""
    calls = []
    sgd_step = torch.optim.SGD.step

    def counted(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == step:
            raise Killed
        return sgd_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", counted)
        with pytest.raises(Killed):
            train(recipe, cpu=True)


def same_weights(first: Path, second: Path) -> bool:
    a, b = state(first / "model"), state(second / "model")
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def reseal(checkpoint: Path) -> None:
    """Rewrite the checkpoint's manifest (when it has one) to match its files: a checkpoint crafted in full."""
    manifest = checkpoint / "manifest.json"
    if manifest.exists():
        files = {path.name: {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                 for path in sorted(checkpoint.iterdir()) if path != manifest}
        manifest.write_text(json.dumps({"files": files}))


def state_files(checkpoint: Path) -> list[Path]:
    return [path for path in checkpoint.iterdir() if path.name != "manifest.json"]


TARGETS = {  # which file of a checkpoint is damaged
    "largest file": lambda checkpoint: max(state_files(checkpoint), key=lambda path: path.stat().st_size),
    "smallest file": lambda checkpoint: min(state_files(checkpoint), key=lambda path: path.stat().st_size),
    "manifest": lambda checkpoint: checkpoint / "manifest.json",
}
DAMAGES = {  # what can happen to it
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "missing": lambda path: path.unlink(),
    "one byte flipped": lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1])),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(data, uninterrupted, tmp_path, monkeypatch,
                                                                  capsys, damage, target):
    recipe = stream_run(data, tmp_path / "run")
    kill_at_step(monkeypatch, recipe, STEPS_PER_EPOCH + 2)  # checkpoints after steps 4 (the epoch's end) and 5
    previous, last = checkpoints(tmp_path / "run")
    DAMAGES[damage](TARGETS[target](last))
    capsys.readouterr()
    train(recipe, cpu=True)
    notices = [line for line in capsys.readouterr().out.splitlines() if last.name in line]
    assert len(notices) == 1 and "damaged" in notices[0] and previous.name in notices[0], notices
    assert same_weights(uninterrupted, tmp_path / "run")
    assert_same_metrics(tmp_path / "run", uninterrupted)


def test_no_usable_checkpoint_stops_with_the_folder_named(data, tmp_path, monkeypatch):
    recipe = stream_run(data, tmp_path / "run")
    kill_at_step(monkeypatch, recipe, 3)
    for checkpoint in checkpoints(tmp_path / "run"):
        DAMAGES["truncated"](TARGETS["largest file"](checkpoint))
    with pytest.raises(RuntimeError, match=f"no usable checkpoint in {tmp_path / 'run' / 'checkpoints'}"):
        train(recipe, cpu=True)


class FullFile(io.FileIO):
    """A file on a full disk: every write fails as the kernel fails it."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)


def fill_disk(monkeypatch, is_full) -> None:
    """Writes to the paths ``is_full`` selects fail as each writer fails on a full disk (measured on a 64 KiB
    tmpfs): Python's file writes with OSError ENOSPC; ``torch.save`` to a path with its zip writer's bare
    RuntimeError; safetensors with its SafetensorError."""
    real_open, real_save, real_save_file = builtins.open, torch.save, safetensors.torch.save_file

    def open_full(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and is_full(Path(file)):
            raw = FullFile(file, "w")
            binary = io.BufferedWriter(raw)
            return binary if "b" in mode else io.TextIOWrapper(binary, encoding=kwargs.get("encoding"))
        return real_open(file, mode, *args, **kwargs)

    def save_full(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and is_full(Path(f)):
            Path(f).touch()
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    def save_file_full(tensors, filename, *args, **kwargs):
        if is_full(Path(filename)):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", open_full)
    monkeypatch.setattr(torch, "save", save_full)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file_full)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", save_file_full)  # Accelerate's own reference


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(data, uninterrupted, tmp_path, monkeypatch):
    recipe = stream_run(data, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    with monkeypatch.context() as patch:
        fill_disk(patch, lambda path: ".partial-step-00000002" in str(path))
        with pytest.raises(OSError, match=f"no space left on the device .*{folder / 'step-00000002'}.*the previous "
                                          f"checkpoint {folder / 'step-00000001'} is intact"):
            train(recipe, cpu=True)
    assert [path.name for path in folder.iterdir()] == ["step-00000001"]  # the partial one removed
    train(recipe, cpu=True)  # space freed: the same command resumes
    assert same_weights(uninterrupted, tmp_path / "run")
    assert_same_metrics(tmp_path / "run", uninterrupted)


def test_a_kill_between_the_metrics_row_and_its_checkpoint_logs_the_epoch_once(data, uninterrupted, tmp_path,
                                                                                monkeypatch):
    recipe = stream_run(data, tmp_path / "run", checkpoint_every=0)

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(zoo.training.run_folder.RunFolder, "save_checkpoint", killed)  # the end of epoch 1, row written
        with pytest.raises(Killed):
            train(recipe, cpu=True)
    assert [row["epoch"] for row in rows(tmp_path / "run")] == [1]
    train(recipe, cpu=True)
    assert [row["epoch"] for row in rows(tmp_path / "run")] == [1, 2]
    csv_lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines] == ["epoch", "1", "2"]
    assert_same_metrics(tmp_path / "run", uninterrupted)


@pytest.mark.parametrize("killed_at", [2, STEPS_PER_EPOCH + 3])  # mid-epoch in epoch 1, in epoch 2
def test_a_mid_epoch_resume_reports_the_whole_epochs_training_metrics(data, uninterrupted, tmp_path, monkeypatch,
                                                                      killed_at):
    recipe = stream_run(data, tmp_path / "run")
    kill_at_step(monkeypatch, recipe, killed_at)
    train(recipe, cpu=True)
    assert_same_metrics(tmp_path / "run", uninterrupted)


def test_two_processes_resumed_mid_epoch_report_the_uninterrupted_metrics(data, uninterrupted, tmp_path):
    """Each process's sums since the last checkpoint are added over the processes into it, and only those."""
    tests = Path(__file__).parent
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(tests / "launch_training.py"), str(tmp_path), "castream_imagenet", "--model", "resnet18_castream",
               "--set", f"model_args={json.dumps(SMALL_BACKBONE)}", "--weights", "none", "--data-root", str(data),
               "--image-size", "32", "--workers", "0", "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "1",
               "--output-dir", str(tmp_path / "run"), "--cpu"]
    killed = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoints(tmp_path / "run") and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        process.send_signal(signal.SIGKILL)  # the two processes (each in a session of its own), the launcher
    killed.wait()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "running", \
        "the run finished before it could be killed"
    resumed = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    position = resumed.stdout[resumed.stdout.index("resumed from"):].split("\n")[0]
    assert "batch 0)" not in position, f"expected a resume in the middle of an epoch: {position}"
    assert_same_metrics(tmp_path / "run", uninterrupted)


class Payload:
    """A pickle whose loading creates ``marker``: stands for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_unpickles_a_planted_payload(data, tmp_path, monkeypatch):
    recipe = stream_run(data, tmp_path / "killed")
    kill_at_step(monkeypatch, recipe, 3)
    pickled = [path.name for path in checkpoints(tmp_path / "killed")[-1].iterdir()
               if path.suffix not in (".safetensors", ".json")]
    assert pickled
    for name in pickled:
        run, marker = tmp_path / name / "run", tmp_path / name / "marker"
        shutil.copytree(tmp_path / "killed", run)
        for checkpoint in checkpoints(run):  # every checkpoint: no intact one to fall back to
            torch.save(Payload(marker), checkpoint / name)
            reseal(checkpoint)
        refusal = None
        try:
            train(stream_run(data, run), cpu=True)
        except Exception as error:  # refusing is right, provided the message names the file
            refusal = error
        assert not marker.exists(), f"resume unpickled the payload planted in {name}"
        assert refusal is None or name in str(refusal), refusal


def yaml_recipe(data: Path, folder: Path, line: str = "") -> Path:
    """The stream recipe as a YAML file, with ``line`` added."""
    path = folder / "recipe.yaml"
    path.write_text("\n".join([
        "model: resnet18_castream", f"model_args: {json.dumps(SMALL_BACKBONE)}", "freeze_backbone: true",
        "dataset: imagenet-folder", f"data_root: {data}", "val_split: val", "epochs: 1", "batch_size: 4",
        "image_size: 32", "workers: 0", f"output_dir: {folder / 'run'}", line]))
    return path


BAD_VALUES = [  # (how the value is given, the setting, the value as the message shows it)
    ("yaml", "epochs: 1.5", "epochs", "1.5"),
    ("yaml", "lr: .nan", "lr", "nan"),
    ("yaml", "lr: .inf", "lr", "inf"),
    ("yaml", "lr: fast", "lr", "'fast'"),
    ("yaml", "milestones: 5", "milestones", "5"),
    ("yaml", "weight_decay: 1e-4", "weight_decay", "'1e-4'"),  # YAML 1.1 reads this one as text
    ("yaml", "model_args: [resnet10t]", "model_args", "['resnet10t']"),
    ("yaml", "name: 7", "name", "7"),
    ("cli", "epochs=abc", "epochs", "'abc'"),
    ("cli", "epochs=true", "epochs", "True"),
    ("cli", "batch_size=4.0", "batch_size", "4.0"),
    ("cli", "milestones=[10, 2.5]", "milestones", "[10, 2.5]"),
    ("cli", "milestones=[-1]", "milestones", "[-1]"),
    ("cli", "lr=Infinity", "lr", "inf"),
    ("cli", "momentum=NaN", "momentum", "nan"),
    ("cli", "gamma=-0.1", "gamma", "-0.1"),
    ("cli", "freeze_backbone=1", "freeze_backbone", "1"),
    ("cli", "val_limit=8.0", "val_limit", "8.0"),
    ("cli", "image_size=0", "image_size", "0"),
    ("cli", "data_config=\"crop_pct\"", "data_config", "'crop_pct'"),
    ("cli", "weights=5", "weights", "5"),
    ("cli", "workers=-1", "workers", "-1"),
    ("cli", "seed=-1", "seed", "-1"),
    ("cli", "gd_error=\"l3\"", "gd_error", "'l3'"),
    ("cli", "optimizer=\"adamx\"", "optimizer", "'adamx'"),
    ("cli", "optimizer_args={\"betas\": [0.9, 0.99]}", "optimizer_args", "{'betas': [0.9, 0.99]}"),  # not SGD's
    ("yaml", "optimizer_args: [adamw]", "optimizer_args", "['adamw']"),
    ("cli", "schedule=\"plateau\"", "schedule", "'plateau'"),
    ("cli", "schedule_args={\"min_lr\": 0.1}", "schedule_args", "{'min_lr': 0.1}"),  # timm's, not milestones'
    ("yaml", "schedule: cosine\nschedule_args: {min_lrr: 0.1}", "schedule_args", "{'min_lrr': 0.1}"),
]


@pytest.mark.parametrize("given, text, setting, shown", BAD_VALUES)
def test_a_bad_recipe_value_is_named_before_anything_is_written(data, tmp_path, given, text, setting, shown):
    recipe = yaml_recipe(data, tmp_path, text if given == "yaml" else "")
    overrides = ["--set", text] if given == "cli" else []
    with pytest.raises(ValueError, match=rf"\b{setting}\b[^;]*{re.escape(shown)}"):
        zoo.training.train.main([str(recipe), *overrides, "--cpu", "--release-freed-memory"])
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_split_is_named_before_anything_is_written(tmp_path):
    make_cub(tmp_path / "data", images=tuple(CubImage(1 + i % 2, True, (8, 8, 40, 30)) for i in range(8)))
    recipe = load_recipe("finetune_cub", model="resnet10t", weights=None, epochs=1, output_dir=str(tmp_path / "run"),
                         **dict(QUICK, data_root=str(tmp_path / "data")))
    with pytest.raises(ValueError, match="the validation split 'test' of cub holds no images"):
        train(recipe, cpu=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("output_dir", ["", ".", "..", "notes", "project"])
def test_overwrite_never_deletes_what_is_not_a_run(data, tmp_path, monkeypatch, output_dir):
    """``--overwrite`` with an empty or dot output_dir, or a folder of other files, deletes nothing."""
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    kept = [project / "README.md", project / "notes" / "paper.txt", tmp_path / "beside.txt"]
    for path in kept:
        path.write_text("keep me")
    monkeypatch.chdir(project)
    where = {"project": str(project)}.get(output_dir, output_dir)
    with pytest.raises(FileExistsError, match="working directory|holds no run"):
        train(stream_run(data, project, output_dir=where, epochs=1, checkpoint_every=0), overwrite=True, cpu=True)
    assert all(path.read_text() == "keep me" for path in kept)
