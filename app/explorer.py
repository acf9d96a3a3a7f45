"""What the explorer computes and draws, without its page (``ui.py`` puts it on one): a model loaded by any name
timm takes, an image prepared as the model sees it, its top classes, its built-in saliency, the maps of the
methods asked for and their scores on this image. Every method, metric and loader is the library's; this module
only chooses what to call and draws the results.
"""

import functools
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from matplotlib import cbook
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
from torch import nn
from torchvision import tv_tensors

import zoo
from zoo.data import FASHION_MNIST_DEBIAN_DIR, FashionCanvas
from zoo.data.transforms import eval_transform
from zoo.evaluation.figures import grid, overlay, pixels
from zoo.evaluation.harness import measure
from zoo.evaluation.metrics import PROBABILITIES, check_probabilities, target_probabilities
from zoo.evaluation.saliency import METHODS, explain, has_patch_grid, normalise_per_image
from zoo.hub import HF_HUB, LOCAL_DIR, load_model, resolve_weights
from zoo.metrics import METRICS
from zoo.output import logits_of

__all__ = ["BUILT_IN", "MAX_PIXELS", "METHOD_GROUPS", "PREDICTED", "AppError", "Explained", "LoadedModel", "Prepared",
           "box_from_file", "box_text", "builtin_maps", "curves_figure", "default_model", "demo_models",
           "example_inputs", "explain_and_score", "label", "load", "method_choices", "overlay_picture", "parse_box",
           "prepare", "read_image", "scores_table", "target_index", "top_classes"]

MAX_PIXELS = 40_000_000  # larger uploads are refused: a decompression bomb, or a mistake
PREDICTED = "predicted class"
BUILT_IN = "attention"  # the saliency method that reads a zoo model's built-in map
# the methods offered, by family; the transformer family only for models that embed patches (ViT, DeiT)
METHOD_GROUPS = {
    "CAM family": ["cam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam",
                   "fakecam"],
    "Opti-CAM": ["opticam"],
    "gradients": ["gradient", "guided_backprop"],
    "vision transformers": ["rawattention", "rollout", "generic_attention", "tibav"],
}
SCORED = ("AD", "AG", "AI", "I", "D")  # the scores of every map; with a box also
SCORED_ON_BOX = ("SP", "EP")


class AppError(ValueError):
    """A problem with what the user gave, said in words for the page."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    name: str  # as the user gave it
    architecture: str
    data_config: dict
    classes: list[str]
    warning: str | None  # said on the page: random weights

    @property
    def has_builtin_saliency(self) -> bool:
        return hasattr(self.model, "return_saliency")

    def describe(self) -> str:
        size = "x".join(map(str, self.data_config["input_size"][-2:]))
        text = (f"**{self.architecture}** ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M "
                f"parameters, {len(self.classes)} classes, {size} px input) from `{self.name}`")
        return text + (f"\n\n⚠️ {self.warning}" if self.warning else "")


def demo_models(demo: Path) -> list[str]:
    """The ``local-dir:`` names of the demo's published model folders (``make demo`` writes them to ``hub/``)."""
    hub = demo / "hub"
    folders = sorted(hub.iterdir()) if hub.is_dir() else []
    return [f"{LOCAL_DIR}{folder.resolve()}" for folder in folders if (folder / "config.json").is_file()]


def default_model(demo: Path) -> tuple[str, bool]:
    """(name, random weights): the demo's CA-Stream when the demo has run, else a zoo architecture at random."""
    models = demo_models(demo)
    if not models:
        return "resnet18_castream", True
    return next((name for name in models if "castream" in name), models[0]), False


def _class_names(model: nn.Module, count: int) -> list[str]:
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == count:
        return list(names)
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i).split(",")[0] for i in range(count)]
    return [f"class {i}" for i in range(count)]


@functools.lru_cache(maxsize=4)
def load(name: str, random_weights: bool = False) -> LoadedModel:
    """The model ``name`` names, in eval mode: ``local-dir:<folder>`` or ``hf-hub:<org>/<name>`` (the Hub cache;
    offline mode honoured), ``<arch>.<tag>`` or ``<arch>`` (its default weights) through ``zoo.hub``, or the
    architecture at a random initialisation with ``random_weights``. The last few stay loaded."""
    name = name.strip()
    if not name:
        raise AppError("enter a model name: a timm architecture (resnet18_castream), <arch>.<tag>, "
                       "local-dir:<folder> or hf-hub:<org>/<name>")
    checkpoint = name.startswith((LOCAL_DIR, HF_HUB))
    if random_weights and checkpoint:
        raise AppError(f"{name} names weights; untick random weights, or give an architecture")
    architecture = timm.models.split_model_name_tag(name)[0]
    if not checkpoint and not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture[:6]}*")[:5]
        raise AppError(f"timm knows no model {architecture!r}" + (f"; close: {', '.join(close)}" if close else ""))
    warning = None
    try:
        if random_weights:
            model = timm.create_model(architecture)
            warning = (f"{architecture} has random weights: its predictions and maps say nothing about a trained "
                       "model")
        else:
            weights = resolve_weights(architecture, name if checkpoint or "." in name else "default")
            architecture = weights.architecture or architecture
            classes = len(weights.label_names or ()) or weights.pretrained_cfg.get("num_classes", 1000)
            model = load_model(architecture, weights, classes)
    except (OSError, ValueError, RuntimeError) as error:
        hint = "" if random_weights or checkpoint else " (tick random weights to explore the architecture itself)"
        raise AppError(f"cannot load {name}: {error}{hint}") from None
    model.eval()
    config = resolve_data_config(model=model)
    return LoadedModel(model, name, architecture, config, _class_names(model, model.num_classes), warning)


def method_choices(loaded: LoadedModel) -> list[str]:
    """The methods offered for this model: every family, the transformer one only for a ViT / DeiT."""
    transformer = has_patch_grid(getattr(loaded.model, "backbone", loaded.model))
    return [method for family, methods in METHOD_GROUPS.items() for method in methods
            if transformer or family != "vision transformers"]


def read_image(path: str | Path) -> Image.Image:
    """The image in a file as RGB (grayscale, palette and CMYK converted, transparency put on white), or an
    AppError that says why not: not an image, or more than ``MAX_PIXELS`` pixels."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise AppError(f"the image is {image.width}x{image.height} pixels; at most {MAX_PIXELS / 1e6:.0f} "
                               "megapixels are accepted: resize it first")
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, "white")
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise AppError(f"{Path(path).name} is not an image this app can read ({type(error).__name__}: {error})") \
            from None


def parse_box(text: str | None) -> list[float] | None:
    """``"x0, y0, x1, y1"`` (pixels of the uploaded image, any separators) as a box, None for an empty text."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text or "")
    if not numbers:
        return None
    if len(numbers) != 4:
        raise AppError(f"a box is four numbers x0, y0, x1, y1 (pixels), got {text!r}")
    x0, y0, x1, y1 = map(float, numbers)
    box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise AppError(f"the box {text!r} has no area")
    return box


def box_text(box: Sequence[float]) -> str:
    return ", ".join(f"{value:g}" for value in box)


def box_from_file(path: str | Path) -> str:
    """The box in a small text file (.txt, .json, .csv) holding its four numbers x0, y0, x1, y1."""
    path = Path(path)
    try:
        text = path.read_bytes()[:1000].decode()
    except UnicodeDecodeError:
        raise AppError(f"{path.name} is not a text file holding a box's four numbers x0, y0, x1, y1") from None
    box = parse_box(text)
    if box is None:
        raise AppError(f"{path.name} holds no box: four numbers x0, y0, x1, y1 expected")
    return box_text(box)


@dataclass(frozen=True)
class Prepared:
    """An image as the model sees it."""

    images: torch.Tensor  # [1, C, H, W], normalised
    pixels: np.ndarray  # [H, W, 3] in [0, 1], for display
    box: torch.Tensor | None  # [1, 4] XYXY in the model's input pixels


def prepare(loaded: LoadedModel, image: Image.Image, box: Sequence[float] | None = None) -> Prepared:
    """The model's evaluation preprocessing (resize, centre crop, normalisation) of ``image``; ``box`` (pixels
    of ``image``) follows it, and must keep some area inside the crop."""
    transform = eval_transform(loaded.data_config)
    if box is None:
        tensor, boxes = transform(image), None
    else:
        boxes = tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                         canvas_size=(image.height, image.width))
        tensor, boxes = transform(image, boxes)
        boxes = boxes.as_subclass(torch.Tensor)
        if ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) <= 0).all():
            raise AppError(f"the box {box_text(box)} lies outside the centre crop the model sees")
    return Prepared(tensor[None], pixels(tensor[None], loaded.data_config)[0].numpy(), boxes)


def target_index(loaded: LoadedModel, choice: str | None) -> int | None:
    """The class the user chose by name, or None for the prediction."""
    if not choice or choice == PREDICTED:
        return None
    if choice not in loaded.classes:
        raise AppError(f"{choice!r} is not a class of {loaded.architecture}")
    return loaded.classes.index(choice)


def top_classes(loaded: LoadedModel, prepared: Prepared, k: int = 5,
                probabilities: str = "softmax") -> tuple[dict[str, float], torch.Tensor]:
    """The ``k`` most probable classes with their probabilities ("softmax" over the classes, or "sigmoid" of each
    logit for a multi-label model), and the logits [1, num_classes]."""
    check_probabilities(probabilities)
    with torch.no_grad():
        logits = logits_of(loaded.model(prepared.images)).float()
    scores = PROBABILITIES[probabilities](logits)[0]
    top = scores.topk(min(k, len(scores)))
    return {loaded.classes[i]: float(p) for p, i in zip(top.values, top.indices, strict=True)}, logits


def builtin_maps(loaded: LoadedModel, prepared: Prepared) -> list[tuple[str, torch.Tensor]]:
    """The model's own saliency at the input's size, in [0, 1], with captions: a CA-Stream's attention at every
    stage (the last is its saliency), a SimPool's attention (one map for every class), a zoo CNN's CAM of its
    predicted class; none for other models."""
    size = prepared.images.shape[-2:]
    with torch.no_grad():
        if isinstance(loaded.model, zoo.CAStream):
            attentions = loaded.model.forward_stream(prepared.images).attentions
            last = len(attentions) - 1
            return [(f"stage {i}{', the saliency' if i == last else ''} ({a.shape[-2]}x{a.shape[-1]})",
                     normalise_per_image(a, size)[0]) for i, a in enumerate(attentions)]
        if loaded.has_builtin_saliency:
            output = loaded.model(prepared.images)
            if hasattr(output, "saliency"):
                caption = ("SimPool's attention (the same for every class)" if isinstance(loaded.model, zoo.SimPool)
                           else "built-in CAM of the predicted class")
                return [(caption, normalise_per_image(output.saliency, size)[0])]
    return []


@dataclass(frozen=True)
class Explained:
    """Each method's map [H, W] and its scores on the image (per metric key, natural units) and curves."""

    target: int  # the class explained
    maps: dict[str, torch.Tensor]
    scores: dict[str, dict[str, float]]
    curves: dict[str, tuple[list[float], list[float]]]  # insertion, deletion


def explain_and_score(loaded: LoadedModel, prepared: Prepared, methods: Sequence[str], target: int | None,
                      iterations: int = 100, progress: Callable[[float, str], None] | None = None,
                      probabilities: str = "softmax") -> Explained:
    """The maps of ``methods`` (and of the built-in saliency, when the model has one) for class ``target`` (None:
    the predicted class), and
    their scores: AD / AG / AI terms, insertion and deletion (released preset) with their curves, and the pointing
    game and its energy variant when the image has a box; the class probability is read as ``top_classes``
    reads it. ``progress(fraction, what)`` hears of every step."""
    check_probabilities(probabilities)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise AppError(f"unknown saliency methods {', '.join(unknown)}")
    methods = ([BUILT_IN] if loaded.has_builtin_saliency else []) + [m for m in methods if m != BUILT_IN]
    images = prepared.images
    with torch.no_grad():
        logits = logits_of(loaded.model(images))
    classes = logits.argmax(1) if target is None else torch.tensor([target])
    shared = {"p": target_probabilities(logits, classes, probabilities), "predictions": logits.argmax(1)}
    metrics = [METRICS[key] for key in SCORED]
    if prepared.box is not None:
        shared["boxes"] = [prepared.box]
        metrics += [METRICS[key] for key in SCORED_ON_BOX]
    maps, scores, curves = {}, {}, {}
    for step, method in enumerate(methods):
        if progress:
            progress(step / len(methods), f"{method} ({step + 1} of {len(methods)})")
        options = {"iterations": iterations} if method == "opticam" else {}
        try:
            method_maps = explain(loaded.model, images, method, classes, **options)
        except ValueError as error:
            raise AppError(f"{method}: {error}") from None
        values, inputs = measure(loaded.model, images, method_maps, classes, metrics, shared,
                                 probabilities=probabilities)
        maps[method] = method_maps[0]
        scores[method] = {key: float(value[0]) for key, value in values.items()}
        curves[method] = (inputs["curves"].insertion[0].tolist(), inputs["curves"].deletion[0].tolist())
    if progress:
        progress(1.0, "done")
    return Explained(int(classes[0]), maps, scores, curves)


def label(method: str) -> str:
    return "built-in saliency" if method == BUILT_IN else method


def scores_table(explained: Explained) -> str:
    """The scores as a Markdown table, a row per map, in percent as the harness reports them."""
    keys = list(next(iter(explained.scores.values()))) if explained.scores else []
    header = " | ".join(f"{key} {METRICS[key].arrow}" for key in keys)
    lines = [f"| map | {header} |", "|---|" + "---|" * len(keys)]
    for method, values in explained.scores.items():
        cells = " | ".join(f"{100 * values[key]:.2f}" if METRICS[key].percent else f"{values[key]:.3f}"
                           for key in keys)
        lines.append(f"| {label(method)} | {cells} |")
    names = "; ".join(f"{key}: {METRICS[key].name}" for key in keys)
    return "\n".join(lines) + (f"\n\nOn this one image (per-image terms, in percent): {names}. AD, AG and AI compare "
                               "the class probability on the image and on the image masked by the map; insertion "
                               "and deletion are the areas under the curves below." if keys else "")


def _rendered(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def overlay_picture(pixels: np.ndarray, heatmap: torch.Tensor, box: torch.Tensor | None = None,
                    side: float = 3.0) -> np.ndarray:
    """The image with ``heatmap`` over it (jet colours, as every figure of the zoo) and the box outlined, as an
    RGB array."""
    figure, axes = grid(1, 1, (side, side))
    overlay(axes[0, 0], pixels, heatmap.cpu().numpy(), boxes=() if box is None else box)
    figure.subplots_adjust(0, 0, 1, 1)
    return _rendered(figure)


def curves_figure(explained: Explained) -> Figure:
    """Insertion and deletion curves of every map: the class probability against the share of pixels inserted
    or deleted, in descending order of saliency; the legend gives each area."""
    figure, axes = grid(1, 2, (4.6, 3.2))
    for ax, (title, key, index) in zip(axes[0], (("insertion", "I", 0), ("deletion", "D", 1)), strict=True):
        for method, pair in explained.curves.items():
            values = pair[index]
            steps = np.linspace(0, 1, len(values))
            ax.plot(steps, values, label=f"{label(method)} ({100 * explained.scores[method][key]:.1f})")
        ax.set_title(f"{title} ({key} {METRICS[key].arrow})")
        ax.set_xlabel(f"share of pixels {'inserted' if index == 0 else 'deleted'}")
        ax.set_ylabel("class probability")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def example_inputs(folder: Path, canvases: int = 4) -> list[tuple[str, str]]:
    """(image file, box) pairs for the page's examples, written into ``folder``: canvases of the demo's data (a
    Fashion-MNIST item among clutter, 96 px, with its exact box) when Debian's ``dataset-fashion-mnist`` is
    installed, and the photographs that ship with matplotlib (no box)."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    if (FASHION_MNIST_DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        data = FashionCanvas(FASHION_MNIST_DEBIAN_DIR, "test")
        for index in range(canvases):
            image, target = data.load(index)
            path = folder / f"canvas_{index}_{data.classes[target['label']].replace('/', '-')}.png"
            if not path.exists():
                image.save(path)
            examples.append((str(path), box_text(target["boxes"][0].tolist())))
    for sample in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        path = folder / sample
        if not path.exists():
            shutil.copyfile(cbook.get_sample_data(sample, asfileobj=False), path)
        examples.append((str(path), ""))
    return examples
