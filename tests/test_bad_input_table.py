"""Issue 23, no silent failure: one table of bad inputs and faults, each with the exact behaviour it must give.

Every case either raises the error that names the problem (type and message matched, raised by the zoo's code, never
from inside torch) or shows the documented outcome (a warning, a skip, a resume giving the uninterrupted result); none
may give NaN logits or NaN maps. Models are random-initialised and inputs tiny; the few slow cases (a SIGKILL, two
processes) run the command-line tools on a handful of images.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from data_layouts import make_cub, make_image_folder, make_voc
from safetensors.torch import load_file
from test_bad_input_harness import cub_args
from test_bad_input_training import data, stream_run, uninterrupted  # noqa: F401  (fixtures)
from test_harness import CUB_TEST, FAST, run, scores
from test_publish import publish, save_checkpoint
from test_training import SMALL_BACKBONE
from timm.models import save_for_hf

from zoo.data import CUB200, VOC2012
from zoo.evaluation.harness import main as zoo_eval
from zoo.evaluation.metrics import perturbation_curves, pointing_game
from zoo.evaluation.saliency import explain
from zoo.hub import CheckpointError, FreshPoolingWarning, add_to_hf_cache, load_model, sha256
from zoo.output import checked_inputs
from zoo.training.train import build_model

TORCH = Path(torch.__file__).parent
X = torch.randn(3, 3, 64, 64)
CASES: dict[str, Callable] = {}


def case(name: str):
    """Add the function to the table under ``name`` (the test's id)."""

    def register(function):
        assert name not in CASES, f"two cases named {name}"
        CASES[name] = function
        return function

    return register


def refused(error: type[Exception], message: str, call: Callable, *args, **kwargs) -> Exception:
    """``call(*args, **kwargs)`` raises ``error`` with a message matching ``message`` (a regular expression),
    raised by the zoo's own code rather than deep inside torch."""
    with pytest.raises(error, match=message) as raised:
        call(*args, **kwargs)
    origin = Path(raised.traceback[-1].path)
    assert TORCH not in origin.parents, f"raised inside torch, at {origin}"
    return raised.value


@cache
def model(name: str, **kwargs) -> torch.nn.Module:
    """A random-initialised zoo model in eval mode, built once."""
    small = SMALL_BACKBONE if name.endswith("castream") else {}
    return timm.create_model(name, num_classes=3, **small, **kwargs).eval()


def with_pixel(value: float, *positions: int, images: torch.Tensor = X) -> torch.Tensor:
    images = images.clone()
    for position in positions:
        images[position, 1, 3, 5] = value
    return images


# --- models and explain: non-finite pixels and integer dtypes -------------------------------------------------


def not_finite(name: str, positions: str) -> str:
    return rf"^images for {name} are not finite \(NaN or Inf\) at batch positions {positions}$"


def not_float(name: str, dtype: str) -> str:
    return rf"^{name} expects a floating-point image batch, got torch\.{dtype} \(8-bit pixels\? convert them"


@case("castream-nan-pixel")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_castream", "1"), model("resnet18_castream"), with_pixel(torch.nan, 1))


@case("castream-inf-pixels-in-forward-features")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_castream", "0, 2"), model("resnet18_castream").forward_features,
            with_pixel(torch.inf, 0, 2))


@case("castream-int64-batch")
def _(tmp_path, request):
    refused(ValueError, not_float("resnet18_castream", "int64"), model("resnet18_castream"), X.long())


@case("simpool-nan-pixel")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_simpool", "2"), model("resnet18_simpool"), with_pixel(torch.nan, 2))


@case("simpool-int32-batch")
def _(tmp_path, request):
    refused(ValueError, not_float("resnet18_simpool", "int32"), model("resnet18_simpool"), X.int())


@case("cifar-uint8-image-as-read")
def _(tmp_path, request):
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # what torchvision.io.decode_image gives
    refused(ValueError, not_float("resnet18_cifar", "uint8"), model("resnet18_cifar"), pixels)


@case("cifar-minus-inf-pixel")
def _(tmp_path, request):
    refused(ValueError, not_finite("mobilenetv2_cifar", "0"), model("mobilenetv2_cifar"),
            with_pixel(-torch.inf, 0, images=torch.randn(2, 3, 32, 32)))


@case("cifar-nan-pixel-plain-logits")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_cifar", "1"), model("resnet18_cifar", return_saliency=False),
            with_pixel(torch.nan, 1, images=torch.randn(2, 3, 32, 32)))


@case("explain-uint8-images")
def _(tmp_path, request):
    refused(ValueError, not_float("resnet18_castream", "uint8"), explain, model("resnet18_castream"),
            X.to(torch.uint8), "gradcam")


@case("explain-nan-pixel-builtin-attention")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_castream", "0"), explain, model("resnet18_castream"),
            with_pixel(torch.nan, 0), "attention")


@case("explain-inf-pixel-cifar-scorecam")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_cifar", "1"), explain, model("resnet18_cifar"),
            with_pixel(torch.inf, 1, images=torch.randn(2, 3, 32, 32)), "scorecam")


@case("explain-float-targets")
def _(tmp_path, request):
    refused(ValueError, r"^targets must be 3 integer class indices, one per image, got torch\.float32 of shape "
            r"\(3,\)$", explain, model("resnet18_castream"), X, "gradcam", targets=torch.tensor([0.0, 1.0, 2.0]))


@case("explain-a-target-per-image-missing")
def _(tmp_path, request):
    refused(ValueError, r"^targets must be 3 integer class indices, one per image, got torch\.int64 of shape "
            r"\(2,\)$", explain, model("resnet18_simpool"), X, "gradcam", targets=[0, 1])


@case("explain-target-class-out-of-range")
def _(tmp_path, request):
    refused(ValueError, r"^targets must be class indices in \[0, 3\) for resnet18_castream, got values in \[0, 3\]$",
            explain, model("resnet18_castream"), X, "gradcam", targets=[0, 3, 1])


# --- metrics ------------------------------------------------------------------------------------------------------

MAPS = torch.linspace(0, 1, 128).reshape(2, 8, 8)
BOXES = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[2.0, 2.0, 8.0, 8.0]])]


@case("pointing-game-nan-map")
def _(tmp_path, request):
    maps = MAPS.clone()
    maps[1, 2, 2] = torch.nan
    refused(ValueError, r"^maps holds NaN or Inf at 1 of 128 entries$", pointing_game, maps, BOXES)


@case("pointing-game-map-outside-0-1")
def _(tmp_path, request):
    refused(ValueError, r"^maps must lie in \[0, 1\], got values in \[0, 5\]$", pointing_game, MAPS * 5, BOXES)


@case("pointing-game-nan-box")
def _(tmp_path, request):
    refused(ValueError, "^boxes contain NaN or Inf$", pointing_game, MAPS,
            [BOXES[0], torch.tensor([[2.0, torch.nan, 8.0, 8.0]])])


@case("pointing-game-uint8-maps")
def _(tmp_path, request):
    refused(ValueError, r"^maps must be a float tensor of maps \[N, H, W\], got a torch\.uint8 tensor of shape "
            r"\[2, 8, 8\]$", pointing_game, (MAPS * 255).to(torch.uint8), BOXES)


@case("insertion-uint8-images")
def _(tmp_path, request):
    refused(ValueError, r"^images must be a float tensor \[B, C, H, W\], got torch\.uint8 tensor of shape "
            r"\(3, 3, 64, 64\)$", perturbation_curves, model("resnet18_castream"), X.to(torch.uint8),
            torch.rand(3, 64, 64))


@case("insertion-maps-not-upsampled")
def _(tmp_path, request):
    refused(ValueError, r"^maps are \(2, 2\) but images are \(64, 64\): upsample the maps", perturbation_curves,
            model("resnet18_castream"), X, torch.rand(3, 2, 2))


@case("insertion-nan-pixel")
def _(tmp_path, request):
    refused(ValueError, not_finite("resnet18_castream", "2"), perturbation_curves, model("resnet18_castream"),
            with_pixel(torch.nan, 2), torch.rand(3, 64, 64))


# --- checkpoints: config.json's fields, altered weights, backbone-only weights ---------------------------------


@cache
def cifar_folder(root: Path) -> Path:
    """A checkpoint folder of a 3-class resnet18_cifar as timm saves it (no SHA-256 recorded)."""
    save_for_hf(timm.create_model("resnet18_cifar", num_classes=3), root / "cifar", safe_serialization=True,
                model_config=dict(label_names=["a", "b", "c"], num_classes=3))
    return root / "cifar"


def edited(tmp_path: Path, change: Callable[[dict], object]) -> Path:
    """A copy of the CIFAR checkpoint whose config.json ``change`` edited."""
    folder = shutil.copytree(cifar_folder(tmp_path.parent), tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def config_refused(tmp_path: Path, change: Callable[[dict], object], message: str, through_timm: bool) -> None:
    """The edited checkpoint is refused by zoo.hub.load_model, or by timm.create_model("local-dir:...")."""
    folder = edited(tmp_path, change)
    pattern = f"^{re.escape(str(folder / 'config.json'))}: {message}"
    if through_timm:
        refused(CheckpointError, pattern, timm.create_model, f"local-dir:{folder}", pretrained=True)
    else:
        refused(CheckpointError, pattern, load_model, "resnet18_cifar", f"local-dir:{folder}", 3)


CONFIG_FAULTS = {  # case: (the change to config.json, the message after the file's path, through timm's local-dir:)
    "config-num-classes-a-word": (lambda c: c.update(num_classes="ten"),
                                  "num_classes must be a non-negative integer, got 'ten'$", True),
    "config-num-classes-true": (lambda c: c.update(num_classes=True),
                                "num_classes must be a non-negative integer, got True$", False),
    "config-num-classes-negative": (lambda c: c.update(num_classes=-3),
                                    "num_classes must be a non-negative integer, got -3$", True),
    "config-input-size-strings": (lambda c: c["pretrained_cfg"].update(input_size=["3", "32", "32"]),
                                  r"pretrained_cfg.input_size must be \[channels, height, width\] of positive "
                                  r"integers, got \['3', '32', '32'\]$", True),
    "config-mean-a-string": (lambda c: c["pretrained_cfg"].update(mean="0.5"),
                             "pretrained_cfg.mean must be a list of numbers, got '0.5'$", False),
    "config-std-zero": (lambda c: c["pretrained_cfg"].update(std=[0.2, 0.0, 0.2]),
                        r"pretrained_cfg.std must be a list of positive numbers, got \[0.2, 0.0, 0.2\]$", True),
    "config-label-names-fewer-than-classes": (lambda c: c.update(label_names=["a", "b"]),
                                              "label_names holds 2 names for num_classes 3$", False),
    "config-model-args-a-list": (lambda c: c.update(model_args=["drop_rate", 0.1]),
                                 r"model_args must be an object of keyword arguments, got \['drop_rate', 0.1\]$",
                                 False),  # timm's local-dir: reads model_args itself, before any zoo code runs
    "config-sha256-not-hex": (lambda c: c.update(weights_sha256="not-a-digest"),
                              "weights_sha256 must be 64 lowercase hexadecimal digits, got 'not-a-digest'$", False),
}
for _name, (_change, _message, _through_timm) in CONFIG_FAULTS.items():
    case(_name)(lambda tmp_path, request, change=_change, message=_message, through_timm=_through_timm:
                config_refused(tmp_path, change, message, through_timm))


@case("config-architecture-a-number")
def _(tmp_path, request):
    folder = edited(tmp_path, lambda c: c.update(architecture=42))
    refused(CheckpointError, "config.json names the architecture 42, which timm does not know", load_model,
            "resnet18_cifar", f"local-dir:{folder}", 3)


@case("config-a-json-list")
def _(tmp_path, request):
    folder = edited(tmp_path, lambda c: None)
    (folder / "config.json").write_text("[1, 2]")
    refused(CheckpointError, r"config.json holds a JSON list, not an object of timm's fields$", load_model,
            "resnet18_cifar", f"local-dir:{folder}", 3)


@case("truncated-safetensors-through-timm-local-dir")
def _(tmp_path, request):
    folder = edited(tmp_path, lambda c: None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(CheckpointError, "model.safetensors is not a complete safetensors file", timm.create_model,
            f"local-dir:{folder}", pretrained=True)


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor: still complete safetensors, other numbers
    path.write_bytes(bytes(raw))


ALTERED = r"model.safetensors does not match the SHA-256 recorded in its config.json: altered or corrupted"


@case("published-weights-altered-through-timm-local-dir")
def _(tmp_path, request):
    hub = publish(save_checkpoint(tmp_path / "model"), tmp_path / "hub")
    assert json.loads((hub / "config.json").read_text())["weights_sha256"] == sha256(hub / "model.safetensors")
    flip_a_byte(hub / "model.safetensors")
    refused(CheckpointError, ALTERED, timm.create_model, f"local-dir:{hub}", pretrained=True)


@case("trained-weights-altered-through-timm-hf-hub-and-load-model")
def _(tmp_path, request):
    trained = shutil.copytree(request.getfixturevalue("uninterrupted") / "model", tmp_path / "model")
    assert json.loads((trained / "config.json").read_text())["weights_sha256"] == sha256(trained / "model.safetensors")
    flip_a_byte(trained / "model.safetensors")
    refused(CheckpointError, ALTERED, load_model, "resnet18_castream", f"local-dir:{trained}", 2, **SMALL_BACKBONE)
    add_to_hf_cache(trained, "someone/altered-castream")
    refused(CheckpointError, ALTERED, timm.create_model, "hf-hub:someone/altered-castream", pretrained=True)


@cache
def gap_folder(root: Path) -> Path:
    """A plain GAP ResNet-18 checkpoint folder (3 classes): weights for a CA-Stream's or SimPool's backbone only."""
    save_for_hf(timm.create_model("resnet18", num_classes=3), root / "gap", safe_serialization=True,
                model_config=dict(label_names=["a", "b", "c"], num_classes=3))
    return root / "gap"


def fresh_pooling_warned(load: Callable, name: str, folder: Path) -> None:
    """``load()`` warns exactly once that ``name``'s pooling (every tensor outside its backbone) is freshly
    initialised, and gives a model whose outputs are finite."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load().eval()
    fresh = [w for w in caught if issubclass(w.category, FreshPoolingWarning)]
    assert len(fresh) == 1, [str(w.message) for w in caught]
    pooling = [key.partition(".")[0] for key in loaded.state_dict() if not key.startswith("backbone.")]
    parts = ", ".join(f"{module} ({pooling.count(module)} tensors)" for module in dict.fromkeys(pooling))
    assert str(fresh[0].message) == (
        f"weights {folder / 'model.safetensors'} hold no tensors for the {parts} of {name}: they are "
        f"a backbone's only, so {name}'s pooling keeps its random initialisation (the start of stream training; "
        "fresh_pooling=True says it is meant). Load a checkpoint of the whole model to use a trained one.")
    with torch.no_grad():
        assert loaded(X).logits.isfinite().all()


@case("gap-folder-as-castream-through-local-dir-warns-once")
def _(tmp_path, request):
    folder = gap_folder(tmp_path.parent)
    fresh_pooling_warned(lambda: load_model("resnet18_castream", f"local-dir:{folder}", 3), "resnet18_castream",
                         folder)


@case("gap-folder-as-simpool-through-hf-hub-warns-once")
def _(tmp_path, request):
    snapshot = add_to_hf_cache(gap_folder(tmp_path.parent), "someone/gap-resnet18")
    fresh_pooling_warned(lambda: load_model("resnet18_simpool", "hf-hub:someone/gap-resnet18", 3), "resnet18_simpool",
                         snapshot)


@case("gap-folder-as-castream-for-stream-training-is-silent")
def _(tmp_path, request):
    folder = gap_folder(tmp_path.parent)
    recipe = stream_run(tmp_path, tmp_path / "run", weights=f"local-dir:{folder}", model_args={})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FreshPoolingWarning)
        stream = build_model(recipe, 3)  # as zoo-train starts stream training
    gap = timm.create_model("resnet18", num_classes=3).eval()
    gap.load_state_dict(load_file(folder / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(stream.backbone.eval().forward_features(X), gap.forward_features(X))


# --- datasets --------------------------------------------------------------------------------------------------

def damaged_image(folder: Path, damage: Callable[[Path], object]) -> Path:
    """The first JPEG under ``folder`` (in sorted order), damaged."""
    path = sorted(folder.rglob("*.jpg"))[0]
    damage(path)
    return path


def damaged_cub_image_is_named(tmp_path, damage, reason: str) -> None:
    bad = damaged_image(make_cub(tmp_path), damage)
    dataset = CUB200(tmp_path, "train")
    position = next(i for i, image in enumerate(dataset.images) if image.path == bad)
    refused(OSError, rf"^could not decode the image {re.escape(str(bad))}: {reason}", dataset.__getitem__, position)


@case("cub-jpeg-cut-short")
def _(tmp_path, request):
    damaged_cub_image_is_named(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:400]), "Truncated File Read")


@case("cub-empty-jpeg")
def _(tmp_path, request):
    damaged_cub_image_is_named(tmp_path, lambda p: p.write_bytes(b""), "cannot identify image file")


@case("cub-class-id-not-a-number")
def _(tmp_path, request):
    classes = make_cub(tmp_path) / "classes.txt"
    classes.write_text(classes.read_text().replace("1 001.", "one 001.", 1))
    refused(ValueError, r"classes.txt:1: 'one' is not a valid int", CUB200, tmp_path, "train")


@case("voc-object-without-bndbox")
def _(tmp_path, request):
    annotation = make_voc(tmp_path) / "Annotations" / "2008_000008.xml"
    text = annotation.read_text()
    annotation.write_text(re.sub(r"<bndbox>.*?</bndbox>", "", text, count=1, flags=re.S))
    refused(ValueError, r"2008_000008.xml, object 1: no <bndbox>$", VOC2012(tmp_path, "train").__getitem__, 0)


@case("voc-empty-annotation-file")
def _(tmp_path, request):
    (make_voc(tmp_path) / "Annotations" / "2008_000008.xml").write_bytes(b"")
    refused(ValueError, r"2008_000008.xml: malformed XML \(no element found", VOC2012(tmp_path, "train").__getitem__,
            0)


@case("voc-jpeg-that-is-text")
def _(tmp_path, request):
    bad = make_voc(tmp_path) / "JPEGImages" / "2008_000008.jpg"
    bad.write_text("not an image")
    refused(OSError, rf"^could not decode the image {re.escape(str(bad))}: cannot identify image file",
            VOC2012(tmp_path, "train").__getitem__, 0)


# --- the harness: a corrupt JPEG, a SIGKILL, two processes -------------------------------------------------------


@case("harness-corrupt-jpeg-in-an-image-folder")
def _(tmp_path, request):
    root = make_image_folder(tmp_path / "data")
    bad = sorted((root / "val").rglob("*.JPEG"))[1]
    bad.write_bytes(bad.read_bytes()[:300])
    refused(OSError, rf"^could not decode the image {re.escape(str(bad))}", zoo_eval,
            ["resnet18", "--dataset", "imagenet-folder", "--data-root", str(root), "--split", "val", "--methods",
             "gradcam", "--metrics", "faithfulness", "--out", str(tmp_path / "out"), *FAST])


def eval_args(tmp_path: Path, out: str = "out") -> list[str]:
    """zoo-eval's arguments for Grad-CAM's faithfulness on 5 CUB images, 3 batches of 2 (made here), with timm's
    smallest ResNet."""
    if not (tmp_path / "data").exists():
        make_cub(tmp_path / "data", images=CUB_TEST)
    return ["resnet10t", *cub_args(tmp_path / "data", "--methods", "gradcam", "--metrics", "faithfulness")[1:],
            "--out", str(tmp_path / out), *FAST]


ZOO_EVAL = [sys.executable, "-m", "zoo.evaluation.harness"]


def alone(tmp_path: Path) -> dict:
    """The results of the run of ``eval_args`` that nothing disturbed."""
    _, results = run(tmp_path / "alone", *eval_args(tmp_path)[:-len(FAST) - 2])
    return results


@case("harness-sigkill-mid-run-then-resume")
def _(tmp_path, request):
    killed = subprocess.Popen([*ZOO_EVAL, *eval_args(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, deadline = tmp_path / "out", time.monotonic() + 300
    while not list(out.glob("*/batches/000000.safetensors")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (run_dir,) = out.iterdir()
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"
    zoo_eval(eval_args(tmp_path))  # the same command again
    resumed = json.loads((run_dir / "results.json").read_text())
    assert "damaged" not in request.getfixturevalue("capsys").readouterr().out
    clean = alone(tmp_path)
    assert scores(resumed) == scores(clean) and resumed["images"] == clean["images"] == 5


@case("harness-two-processes-on-one-output-folder")
def _(tmp_path, request):
    processes = [subprocess.Popen([*ZOO_EVAL, *eval_args(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert scores(results) == scores(alone(tmp_path)) and results["images"] == 5
    assert sorted(path.name for path in (run_dir / "batches").iterdir()) == [f"{k:06d}.safetensors" for k in range(3)]


# --- training -----------------------------------------------------------------------------------------------------


@case("training-sigkill-mid-epoch-then-resume-is-bit-identical")
def _(tmp_path, request):
    data_root = request.getfixturevalue("data")
    command = [sys.executable, "-m", "zoo.training.train", "castream_imagenet", "--model", "resnet18_castream",
               "--set", f"model_args={json.dumps(SMALL_BACKBONE)}", "--weights", "none", "--data-root", str(data_root),
               "--image-size", "32", "--workers", "0", "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "1",
               "--cpu"]
    killed = subprocess.Popen([*command, "--output-dir", str(tmp_path / "run")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoints, deadline = tmp_path / "run" / "checkpoints", time.monotonic() + 300
    while (not any(int(path.name[5:]) >= 2 for path in checkpoints.glob("step-*")) and killed.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)  # after the second step of the first epoch's four
    killed.wait()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "running", \
        "the run finished before it could be killed"
    resumed = subprocess.run([*command, "--output-dir", str(tmp_path / "run")], capture_output=True, text=True,
                             check=True)
    assert "batch 0)" not in resumed.stdout[resumed.stdout.index("resumed from"):].split("\n")[0]
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    reference = load_file(request.getfixturevalue("uninterrupted") / "model" / "model.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_or_fault_is_named_never_silent(name, tmp_path, request):
    CASES[name](tmp_path, request)


def test_the_table_holds_at_least_40_cases():
    assert len(CASES) >= 40, len(CASES)


def test_finiteness_is_not_checked_while_torch_compile_traces(monkeypatch):
    """A data-dependent check would break torch.compile's and torch.export's graph: under them the check is left out
    (their eager runs keep it)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert model("resnet18_cifar")(with_pixel(torch.nan, 0, images=torch.randn(1, 3, 32, 32))).logits.isnan().all()


def test_finiteness_is_left_to_the_caller_within_checked_inputs():
    """explain and the harness check their images once, then run the model on masked copies of them without a
    host synchronisation per forward; outside the context the models check again."""
    cifar = model("resnet18_cifar")
    images = with_pixel(torch.nan, 0, images=torch.randn(1, 3, 32, 32))
    with checked_inputs():
        assert cifar(images).logits.isnan().all()
    with pytest.raises(ValueError, match=r"not finite \(NaN or Inf\) at batch positions 0"):
        cifar(images)
