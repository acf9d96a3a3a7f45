"""Hugging Face model cards built from the harness' results: measured numbers only, beside the thesis' figures.

    zoo-card --all                                   # from the repository root: regenerate every card
    zoo-card resnet50_castream.in1k --results results/eval/<key>/results.json

A card folder (``model_cards/<arch>.<tag>/``, or the Hub folder ``zoo-publish`` builds) holds ``README.md``,
the results it reports (``results/<dataset>-<protocol key>.json``, each with the harness' ``examples.png`` as
``results/<dataset>-<protocol key>.png``) and, for a checkpoint that is not a registered tag, its ``config.json``.
A folder zoo-card or zoo-publish creates holds the marker ``.zoo-card``: only such a folder (or an empty one) is
ever replaced by ``zoo-publish --cards`` or ``--out --overwrite``. A name that becomes a path (the card's, a results
file's dataset and protocol key) must follow the Hub's repository-name rules and stay inside its folder. Results
are refused unless measured on the card's model: its architecture and class count, and its weights where the card's
``config.json`` records their SHA-256 (``weights_sha256``, as zoo-publish writes it); every number must be finite.
``README.md`` is generated from those files alone, so regenerating gives the same card: its YAML front matter
(``library_name: timm``, license, tags, the training dataset, ``base_model``, and a ``model-index`` entry for every
number measured on at least ``MIN_IMAGES`` images, timings excepted; fewer are marked so in the tables) and a body
with the thesis-layout tables, the protocol, usage, the example maps, limitations and citations. What the weights
are (licence, training data, starting weights) comes from the run's record in ``config.json`` (``training``, as
zoo-train writes it), or a registered tag's registry entry, never from an architecture's default tag; a dataset is
named as released only with its full class count, and the thesis' figures appear only beside results measured as
the thesis did (``follows_thesis_protocol``) or, for a registered tag without results, for reference. Its folder
is ``model_cards/`` in the working directory unless ``--root`` names another. Front-matter keys the generator does
not write (added by hand or on the Hub) and extra tags are kept when a card is regenerated. A checkpoint without
results gets a card that says so.
"""

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import zoo
from zoo.evaluation.thesis_tables import TABLE_3_1, TABLE_3_2, TABLE_3_3, TABLE_4_1
from zoo.hub import CONFIG_FILE, hub_id, read_config
from zoo.metrics import METRICS, RECOGNITION, Metric, tables
from zoo.models.cost import parameter_count

from . import metrics as _declared  # noqa: F401  (registers the interpretability metrics the tables show)

__all__ = ["BIBTEX", "CARDS_DIR", "CARD_MARKER", "MIN_IMAGES", "add_results", "check_replaceable", "check_tag_claim",
           "create_card_folder", "follows_thesis_protocol", "inside", "main", "regenerate", "release", "safe_name",
           "thesis_rows", "write_card"]

CARDS_DIR = Path("model_cards")  # zoo-card's default: in the working directory (the repository's root), never the
# installed package's folder
CARD_MARKER = ".zoo-card"  # in every folder zoo-card or zoo-publish created: the only non-empty folders they replace
MARKER_TEXT = "Created by interpretable-zoo's zoo-card or zoo-publish, which may replace this whole folder.\n"
NAME_RULES = ("the Hub's repository-name rules: letters, digits, '-', '_' and '.', not starting or ending with '-' "
              "or '.', no '--' or '..', at most 96 characters")

BIBTEX = r"""@phdthesis{torres2024thesis,
  author = {Torres Figueroa, Felipe},
  title  = {Learning discriminative representations to interpret image recognition models},
  school = {Aix-Marseille Universit{\'e}},
  year   = {2024}
}
@inproceedings{torres2024castream,
  author    = {Torres, Felipe and Zhang, Hanwei and Sicre, Ronan and Ayache, St{\'e}phane and Avrithis, Yannis},
  title     = {{CA-Stream}: Attention-based pooling for interpretable image recognition},
  booktitle = {CVPR Workshop on Explainable AI},
  year      = {2024}
}
@article{zhang2024opticam,
  author  = {Zhang, Hanwei and Torres, Felipe and Sicre, Ronan and Avrithis, Yannis and Ayache, St{\'e}phane},
  title   = {{Opti-CAM}: Optimizing saliency maps for interpretability},
  journal = {Computer Vision and Image Understanding},
  year    = {2024}
}
@inproceedings{torres2024gradients,
  author    = {Torres, Felipe and Zhang, Hanwei and Sicre, Ronan and Avrithis, Yannis and Ayache, St{\'e}phane},
  title     = {A Learning Paradigm for Interpretable Gradients},
  booktitle = {International Conference on Computer Vision Theory and Applications (VISAPP)},
  year      = {2024}
}"""

MIN_IMAGES = 1000  # fewer evaluated images: the figure is marked so in the card and left out of its model-index


@dataclass(frozen=True)
class Release:
    """A dataset as released: data a reader of its layout gives with another class count is not it."""

    hub_id: str
    name: str
    classes: int
    split: str  # the harness' evaluation split
    images: int  # in that split


# harness dataset -> the dataset as released; a registered tag's dataset, by the tag's first part
DATASETS = {
    "imagenet-folder": Release("imagenet-1k", "ImageNet-1k", 1000, "val", 50_000),
    "cub": Release("cub-200-2011", "CUB-200-2011", 200, "test", 5_794),
    "voc": Release("pascal-voc-2012", "Pascal VOC 2012", 20, "val", 5_823),
    "cifar100": Release("cifar100", "CIFAR-100", 100, "test", 10_000),
    "fashion-mnist": Release("fashion_mnist", "Fashion-MNIST", 10, "test", 10_000),
    "fashion-mnist-idx": Release("fashion_mnist", "Fashion-MNIST", 10, "test", 10_000),
}
TAG_DATASETS = {"in1k": "imagenet-folder", "c100": "cifar100"}


def release(dataset: str, classes: int) -> Release | None:
    """The released dataset that harness dataset ``dataset`` with ``classes`` classes is, if any: a 3-class folder
    in ImageNet's layout is not ImageNet-1k."""
    known = DATASETS.get(dataset)
    return known if known is not None and known.classes == classes else None


def dataset_names(dataset: str, classes: int) -> tuple[str, str]:
    """(Hub dataset id, display name) of harness dataset ``dataset`` with ``classes`` classes; data that is no
    released dataset keeps the harness' name."""
    known = release(dataset, classes)
    return (known.hub_id, known.name) if known else (dataset, f"`{dataset}` data, {classes} classes")


UNREPORTED = ("seconds_per_image",)  # depends on the machine, not on the checkpoint: kept in the results file only

METHOD_NAMES = {
    "cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "axiomcam": "Axiom-CAM",
    "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM", "layercam": "Layer-CAM", "hirescam": "HiRes-CAM",
    "opticam": "Opti-CAM", "fakecam": "Fake-CAM", "attention": "built-in attention", "gradient": "gradient",
    "guided_backprop": "guided backprop", "box": "ground-truth box", "box_complement": "box complement",
}

FAMILIES = {  # model class -> (tag, what it is, what `saliency` is)
    zoo.CAStream: ("ca-stream", "A CA-Stream model (thesis ch. 3): a cross-attention stream beside the timm "
                   "backbone `{backbone}` pools its features in place of global average pooling.",
                   "the last stage's attention `[B, h, w]`, non-negative, summing to 1 per image; class-agnostic"),
    zoo.SimPool: ("simpool", "A SimPool model (Psomas et al., ICCV 2023): timm's `SimPool2d` attention pooling "
                  "replaces the global average pooling of the timm backbone `{backbone}`, a baseline for CA-Stream.",
                  "SimPool's attention over the last stage's positions `[B, h, w]` (the heads' mean), non-negative, "
                  "summing to 1 per image; class-agnostic"),
    zoo.CamClassifier: ("class-activation-map", "A CIFAR network with a built-in class activation map (thesis "
                        "ch. 4): GAP and a linear classifier after a stride-8 body.",
                        "the exact CAM of the predicted class `[B, h, w]` (its mean plus the bias is the logit)"),
    torch.nn.Module: ("gap-baseline", "A timm classifier with global average pooling (`{backbone}`): the GAP "
                      "baseline the zoo's interpretable models are measured against.", None),
}


def _is_hub_name(value) -> bool:
    """Whether ``value`` may name a Hub repository (without organisation), by huggingface_hub's own check."""
    if not isinstance(value, str) or "/" in value:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def safe_name(value, what: str) -> str:
    """``value`` if it is a Hub repository name (hence a plain file or folder name); ``ValueError`` naming ``what``
    otherwise."""
    if not _is_hub_name(value):
        raise ValueError(f"{what} {value!r} is refused: a name that becomes a path follows {NAME_RULES}")
    return value


def inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused (naming ``what``) unless ``name`` is a ``safe_name`` and resolves to an entry of
    ``root`` itself (not through a link elsewhere)."""
    path = root / safe_name(name, what)
    if path.resolve().parent != root.resolve():
        raise ValueError(f"{what} {name!r} is refused: {path} resolves to {path.resolve()}, outside {root}")
    return path


def create_card_folder(folder: Path, exist_ok: bool = True) -> Path:
    """``folder``, created with the marker that lets zoo-card and zoo-publish replace it; an existing one is left as
    it is where ``exist_ok``."""
    if exist_ok and folder.exists():
        return folder
    folder.mkdir(parents=True)
    (folder / CARD_MARKER).write_text(MARKER_TEXT)
    return folder


def check_replaceable(folder: Path, what: str) -> None:
    """Refuse (``FileExistsError`` naming ``what``) to replace ``folder`` unless it is absent, an empty folder or one
    zoo-card or zoo-publish created (it holds the marker), and never the working directory or a folder above it."""
    if not folder.exists() and not folder.is_symlink():
        return
    if Path.cwd().is_relative_to(folder.resolve()):
        raise FileExistsError(f"{what} {folder} holds the working directory: refusing to replace it")
    if folder.is_symlink() or not folder.is_dir() or (any(folder.iterdir()) and not (folder / CARD_MARKER).is_file()):
        raise FileExistsError(f"{what} {folder} is neither an empty folder nor one zoo-card or zoo-publish created (it "
                              f"holds no {CARD_MARKER}): refusing to replace it; choose another or empty it")


@dataclass
class Stored:
    """A results file kept in a card folder."""

    path: str  # relative to the card folder
    results: dict

    @property
    def reported(self) -> bool:
        """Whether it was measured on enough images (``MIN_IMAGES``) to be reported as a figure (model-index)."""
        return self.results["images"] >= MIN_IMAGES

    @property
    def label(self) -> str:
        few = "," if self.reported else (f" on {self.results['images']} images, below the minimum {MIN_IMAGES} for "
                                         "a reported figure;")
        return f"ours (measured{few} `{self.path}`, {self.results['date']})"

    @property
    def figure(self) -> str:
        return self.path.removesuffix(".json") + ".png"


@dataclass
class ModelInfo:
    """What the card says about the model, from its ``config.json`` or, for a registered tag, timm's registry."""

    architecture: str
    num_classes: int
    model_args: dict
    pretrained_cfg: dict
    registered: bool
    weights_sha256: str | None = None  # as the checkpoint's config.json records it
    training: dict | None = None  # what the run did, as zoo-train records it in config.json

    @classmethod
    def of(cls, folder: Path, name: str) -> "ModelInfo":
        if (folder / CONFIG_FILE).is_file():
            config = read_config(folder)
            return cls(config["architecture"], config["num_classes"], config.get("model_args", {}),
                       config.get("pretrained_cfg", {}), name in zoo.list_models(pretrained=True),
                       config.get("weights_sha256"), config.get("training"))
        if name not in zoo.list_models(pretrained=True):
            raise ValueError(f"{name} is not a registered tag and {folder} holds no {CONFIG_FILE} to describe it")
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        return cls(cfg["architecture"], cfg["num_classes"], {}, cfg, True)

    def meta_model(self) -> torch.nn.Module:
        with torch.device("meta"):
            return timm.create_model(self.architecture, **{"num_classes": self.num_classes, **self.model_args})

    def training_data(self, name: str) -> Release | None:
        """The released dataset the weights were trained on: as the run recorded it, else as a registered tag
        declares it; None for other data or where nothing says."""
        if self.training is not None:
            return release(self.training["dataset"], self.training["classes"])
        declared = _tag_dataset(name) if self.registered else None
        return None if declared is None else DATASETS[declared]

    def license(self) -> str | None:
        """The weights' licence as the run recorded it, else as a registered tag declares it."""
        if self.training is not None:
            return self.training["license"]
        return self.pretrained_cfg.get("license") if self.registered else None


def _backbone(model: torch.nn.Module) -> str:
    """The timm architecture a zoo model is built on (a CA-Stream's or SimPool's backbone), or the model's own."""
    return (model.backbone if isinstance(model, zoo.PooledBackbone) else model).pretrained_cfg["architecture"]


def follows_thesis_protocol(item: "Stored", info: ModelInfo) -> bool:
    """Whether a results file measured what the thesis' tables report: the released dataset (its class count), its
    whole evaluation split, at the checkpoint's own input size, on the architecture's own backbone."""
    protocol = item.results["protocol"]
    known = release(protocol["dataset"], protocol["num_classes"])
    with torch.device("meta"):
        as_registered = timm.create_model(info.architecture, num_classes=info.num_classes)
    return (known is not None and protocol["split"] == known.split and not protocol.get("limit")
            and item.results["images"] == known.images
            and protocol["data_config"]["input_size"][-1] == info.pretrained_cfg.get("input_size", [0])[-1]
            and _backbone(info.meta_model()) == _backbone(as_registered))


def _family(model: torch.nn.Module) -> type:
    """The entry of ``FAMILIES`` that describes ``model``: a zoo family, else a plain classifier (a GAP baseline)."""
    return next(cls for cls in FAMILIES if isinstance(model, cls))


def _tag_dataset(name: str) -> str | None:
    """The dataset a tag's name declares (``in1k``: ImageNet-1k, ``c100...``: CIFAR-100), if any."""
    return TAG_DATASETS.get(name.partition(".")[2].split("_")[0])


def check_tag_claim(name: str, training: dict | None) -> None:
    """Refuse to name a run's weights ``name`` when its tag declares training data (``.in1k``: ImageNet-1k,
    ``.c100``: CIFAR-100) other than the run's record says it trained on: the name itself would be a claim."""
    declared = _tag_dataset(name)
    if declared is None or training is None or release(training["dataset"], training["classes"]) == DATASETS[declared]:
        return
    trained_on = dataset_names(training["dataset"], training["classes"])[1]
    raise ValueError(f"{name}: its tag declares weights trained on {DATASETS[declared].name}, but this run trained on "
                     f"{trained_on}; publish it under a tag of its own (e.g. {name.partition('.')[0]}.<your-tag>)")


def declared_base_model(name: str) -> str | None:
    """Hub id of the pretrained timm checkpoint a registered tag's notes name as its start, if any."""
    if name not in zoo.list_models(pretrained=True):
        return None
    for word in " ".join(timm.models.get_pretrained_cfg(name).notes or ()).split():
        source = timm.models.get_pretrained_cfg(word) if "." in word else None
        if source is not None and source.hf_hub_id:
            return source.hf_hub_id
    return None


def thesis_rows(name: str, dataset: str) -> tuple[str, list[tuple[str, dict]]]:
    """The thesis' figures for this kind of model on ``dataset``: (its tables, [(row label, row)]), a row holding
    recognition values (``top1`` or ``mAP``) and ``methods``; no rows where the thesis reports none."""
    architecture, _, tag = name.partition(".")
    if dataset == "imagenet-folder" and architecture in TABLE_3_1:
        top1, methods = TABLE_3_3[architecture], TABLE_3_1[architecture]
        return "Tables 3.1 and 3.3", [("GAP baseline", dict(top1=top1["gap_top1"], methods=methods["gap"])),
                                      ("CA-Stream", dict(top1=top1["top1"], methods=methods["ca"]))]
    if architecture == "resnet50_castream" and dataset in TABLE_3_2:
        return "Table 3.2", [("GAP baseline", TABLE_3_2[dataset]["gap"]), ("CA-Stream", TABLE_3_2[dataset]["ca"])]
    if dataset == "cifar100" and architecture in TABLE_4_1 and tag in ("c100", "c100_gd"):
        rows = TABLE_4_1[architecture]
        return "Table 4.1", [("baseline", rows["baseline"]),
                             (f"gradient denoising, cosine, λ {rows['cosine']['weight']:g}", rows["cosine"])]
    return "", []


def _checked(results: dict, path: Path, info: ModelInfo) -> dict:
    """``results``, refused unless measured on the model ``info`` describes (architecture, class count, and the
    weights where their SHA-256 is known) and every number is finite."""
    missing = [key for key in ("protocol", "key", "recognition", "methods") if key not in results]
    if missing:
        raise ValueError(f"{path} is not a zoo-eval results file (no {', '.join(missing)})")
    protocol = results["protocol"]
    if protocol["model"] != info.architecture:
        raise ValueError(f"{path} holds results of {protocol['model']}, not of {info.architecture}")
    if protocol["weights"] is None:
        raise ValueError(f"{path} was measured on a random initialisation, not on trained weights")
    if protocol["num_classes"] != info.num_classes:
        raise ValueError(f"{path} was measured with num_classes {protocol['num_classes']}, the checkpoint has "
                         f"{info.num_classes}: results of another classifier")
    measured = protocol.get("weights_sha256")
    if info.weights_sha256 is not None and measured is None:
        raise ValueError(f"{path} does not record the SHA-256 of the weights it measured (protocol.weights_sha256; "
                         "written before zoo-eval recorded it): re-run zoo-eval on this checkpoint")
    if info.weights_sha256 is not None and measured != info.weights_sha256:
        raise ValueError(f"{path} was measured on other weights (protocol.weights_sha256 {measured}, not the "
                         f"checkpoint's {info.weights_sha256}): re-run zoo-eval on this checkpoint")
    for group, values in (("recognition", results["recognition"]), *results["methods"].items()):
        for metric, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{path} reports {group} {metric} = {value!r}, not a finite number")
    return results


def _stored_paths(folder: Path, results: dict, path: Path) -> tuple[Path, Path]:
    """Where a results file and its figure go in a card folder: ``results/<dataset>-<key>.json`` and ``.png``,
    refused unless the names are safe and stay in ``results/``."""
    stem = "-".join(safe_name(value, f"{path}: {field}") for field, value in
                    (("protocol.dataset", results["protocol"]["dataset"]), ("key", results["key"])))
    return tuple(inside(folder / "results", stem + suffix, f"{path}: stored as") for suffix in (".json", ".png"))


def add_results(folder: Path, paths: list[Path], name: str) -> None:
    """Store results files of checkpoint ``name`` (and the ``examples.png`` beside each) in its card folder, once
    every one is known to be of the folder's model (``ModelInfo``) and to stay in the folder.

    A stored file gains a ``date``, the day its source was written (UTC), unless it has one already.
    """
    info = ModelInfo.of(folder, name)
    checked = []
    for path in map(Path, paths):
        results = _checked(json.loads(path.read_text()), path, info)
        checked.append((path, results, *_stored_paths(folder, results, path)))
    if checked:
        (create_card_folder(folder) / "results").mkdir(exist_ok=True)
    for path, results, target, figure in checked:
        results.setdefault("date", datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date().isoformat())
        target.write_text(json.dumps(results, indent=2) + "\n")
        if (path.parent / "examples.png").is_file():
            shutil.copyfile(path.parent / "examples.png", figure)


def read_results(folder: Path, info: ModelInfo) -> list[Stored]:
    """The results files a card folder holds, in name order, each checked against the folder's model."""
    return [Stored(str(path.relative_to(folder)), _checked(json.loads(path.read_text()), path, info))
            for path in sorted((folder / "results").glob("*.json"))]


def _index_names(key: str) -> tuple[str, str]:
    """(model-index metric type, readable name) of a results file's key, from its declaration; a key the registry
    does not know keeps its own name."""
    metric = METRICS.get(key)
    return (key, key) if metric is None else (metric.index_type, metric.name)


def eval_results(stored: list[Stored]) -> list[EvalResult]:
    """One model-index entry per number of every results file (timings excepted)."""
    entries = []
    for item in filter(lambda item: item.reported, stored):
        protocol = item.results["protocol"]
        dataset_id, dataset_name = dataset_names(protocol["dataset"], protocol["num_classes"])
        common = dict(task_type="image-classification", dataset_type=dataset_id, dataset_name=dataset_name,
                      dataset_split=protocol["split"], metric_args={"results": item.path})
        for key, value in item.results["recognition"].items():
            kind, name = _index_names(key)
            entries.append(EvalResult(**common, metric_type=kind, metric_name=name, metric_value=value))
        for method, values in item.results["methods"].items():
            for key, value in values.items():
                if key not in UNREPORTED:
                    kind, name = _index_names(key)
                    entries.append(EvalResult(**common, metric_type=kind, metric_value=value, metric_config=method,
                                              metric_name=f"{name} ({METHOD_NAMES.get(method, method)})"))
    return entries


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _cells(values: dict, columns: list[Metric]) -> list[str]:
    return [f"{values[metric.key]:.2f}" if metric.key in values else "-" for metric in columns]


def _thesis_beside(name: str, info: ModelInfo, dataset: str, stored: list[Stored]) -> tuple[str, list]:
    """``thesis_rows`` to show beside ``stored``, results on ``dataset``: none unless one follows the thesis'
    protocol (or there are none, for reference)."""
    if stored and not any(follows_thesis_protocol(item, info) for item in stored):
        return "", []
    return thesis_rows(name, dataset)


def _dataset_section(name: str, info: ModelInfo, dataset: str, stored: list[Stored]) -> list[str]:
    """Recognition and interpretability tables on one dataset, laid out as the registry declares them: the thesis'
    rows (where none of ours is measured, or one follows its protocol), then ours."""
    cited, thesis = _thesis_beside(name, info, dataset, stored)
    sources = [(f"thesis (paper's figure): {label}", row.get("methods", {}), row) for label, row in thesis]
    sources += [(item.label, item.results["methods"], item.results["recognition"]) for item in stored]
    lines = [f"### {dataset_names(dataset, info.num_classes)[1]}", ""]
    if thesis:
        lines += [f"Rows marked *thesis* are the paper's own figures ({cited} of the thesis), not measured on these "
                  "weights" + ("; rows marked *ours* come from the results file they name." if stored else "."), ""]
    laid_out = tables()
    columns = [metric for metric in laid_out.pop(RECOGNITION)
               if any(metric.key in recognition for _, _, recognition in sources)]
    lines += _table(["source", *(metric.name for metric in columns)],
                    [[label, *_cells(recognition, columns)] for label, _, recognition in sources]) + [""]
    methods = list(dict.fromkeys(m for _, by_method, _ in sources for m in by_method))
    for title, spec in laid_out.items():
        present = [metric for metric in spec if any(metric.key in values for _, by_method, _ in sources
                                                     for values in by_method.values())]
        rows = [[METHOD_NAMES.get(m, m), label, *_cells(by_method[m], present)]
                for m in methods for label, by_method, _ in sources if m in by_method
                and any(metric.key in by_method[m] for metric in present)]
        if rows:
            lines += [f"{title.capitalize()} (↑: higher is better, ↓: lower):", ""]
            lines += _table(["method", "source", *(f"{metric.key}{metric.arrow}" for metric in present)], rows) + [""]
    return lines


def _protocol(item: Stored, info: ModelInfo) -> str:
    results, protocol = item.results, item.results["protocol"]
    config = protocol["data_config"]
    limit = ", a fixed random sample of the split" if protocol.get("limit") else ""
    options = f"; options {json.dumps(protocol['method_options'])}" if protocol.get("method_options") else ""
    versions = ", ".join(f"{package} {version}" for package, version in results.get("versions", {}).items())
    dataset = dataset_names(protocol["dataset"], protocol["num_classes"])[1]
    own = info.pretrained_cfg.get("input_size", config["input_size"])[-1]
    size = f"{config['input_size'][-1]} px" + ("" if own == config["input_size"][-1] else
                                               f", not the checkpoint's {own} px")
    return (f"- `{item.path}` (protocol `{results['key']}`, {results['date']}): {dataset}, "
            f"`{protocol['split']}` split, {results['images']} images{limit}, {results['explanations']} explanations "
            f"of the {protocol['targets']} class; {size} ({config['interpolation']}, crop "
            f"{config['crop_pct']}); methods {', '.join(protocol['methods'])}{options}; insertion/deletion preset "
            f"`{protocol['curves']}`; precision {protocol.get('precision', 'float32')}; weights "
            f"`{protocol['weights']}`; {versions}.")


def card_body(name: str, info: ModelInfo, model: torch.nn.Module, stored: list[Stored], repo_id: str,
              base_model: str | None) -> str:
    family = _family(model)
    _, description, saliency = FAMILIES[family]
    backbone = _backbone(model) if issubclass(family, zoo.PooledBackbone) else info.architecture
    forward = ("logits = model(transform(image).unsqueeze(0))  # image: a PIL image" if saliency is None else
               "logits, saliency = model(transform(image).unsqueeze(0))  # image: a PIL image")
    explained = (f"`saliency`: {saliency}. Post-hoc maps" if saliency else "No built-in saliency: post-hoc maps")
    cfg = info.pretrained_cfg
    args = ", ".join(f"{k}={v!r}" for k, v in info.model_args.items() if k not in ("num_classes", "in_chans"))
    create = f"\"{name}\"" if info.registered and repo_id == hub_id(name) else f"\"hf-hub:{repo_id}\""
    lines = [f"# {name}", "", description.format(backbone=backbone)
             + (" One forward pass gives the logits and a saliency map." if saliency else "")
             + " Part of interpretable-zoo, the reference implementation of F. Torres Figueroa's PhD thesis (2024).",
             "", "## Model details", "",
             f"- **Architecture:** `{info.architecture}`" + (f" ({args})" if args else "")
             + f", {parameter_count(model) / 1e6:.2f} M parameters, {info.num_classes} classes",
             f"- **Input:** {cfg.get('input_size', (3, 224, 224))[-1]} px, {cfg.get('interpolation', 'bicubic')} "
             f"resize, crop {cfg.get('crop_pct', 0.875)}, mean {tuple(cfg.get('mean', ()))}, "
             f"std {tuple(cfg.get('std', ()))}"]
    if base_model:
        lines.append(f"- **Starts from:** [{base_model}](https://huggingface.co/{base_model})")
    if info.training is not None:
        lines.append(f"- **Training:** {_training(info.training)}")
    elif info.registered and cfg.get("notes"):
        lines.append(f"- **Training:** {'; '.join(cfg['notes'])}")
    lines += ["- **Weights:** `model.safetensors` only (no pickled weights); `config.json` in timm's format records "
              "its SHA-256", "", "## Usage", "", "```python", "import timm", "",
              "import zoo  # registers the zoo's architectures with timm", "",
              f"model = timm.create_model({create}, pretrained=True).eval()",
              "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
              forward, "```", "",
              f"{explained}: `zoo.evaluation.saliency.explain(model, images, \"gradcam\")`.",
              "", "## Results", ""]
    by_dataset = {dataset: [item for item in stored if item.results["protocol"]["dataset"] == dataset]
                  for dataset in dict.fromkeys(item.results["protocol"]["dataset"] for item in stored)}
    declared = _tag_dataset(name) if not stored and info.training is None and info.registered else None
    cites_thesis = bool(any(_thesis_beside(name, info, dataset, items)[1] for dataset, items in by_dataset.items())
                        or (declared and thesis_rows(name, declared)[1]))
    if not stored:
        lines += ["**No results yet**: no evaluation of these weights has been run with the zoo's harness "
                  "(`zoo-eval`), so this card reports no measured number.", ""]
        if cites_thesis:
            lines += ["For reference, what the thesis reports for this kind of model:", "",
                      *_dataset_section(name, info, declared, [])]
    for dataset, items in by_dataset.items():
        lines += _dataset_section(name, info, dataset, items)
    if stored:
        lines += ["### Protocol", "", "Measured with `zoo-eval` (see evaluation/README.md for every metric's "
                  "definition); timings are in the results files.", "",
                  *(_protocol(item, info) for item in stored), "",
                  "### Example saliency maps", ""]
        lines += [f"![{item.results['protocol']['dataset']}: {', '.join(item.results['protocol']['methods'])}]"
                  f"({item.figure})" for item in stored] + [""]
    lines += ["## Limitations", ""]
    if cites_thesis:
        lines.append("- The thesis' figures come from the authors' own runs (full validation sets, their code); "
                     "compare measured numbers with them only where the protocol matches theirs (dataset, split, "
                     "image count, insertion/deletion preset).")
    lines += ["- AD, AG, AI, insertion and deletion measure how the model's confidence reacts when the image is "
              "masked by the map: faithfulness to the model, not correctness of the explanation. A near-constant "
              "map (Fake-CAM) already scores well on AD and AI, and deletion feeds out-of-distribution images.",
              "- Trained on one dataset's label set and images, with their biases; not assessed for robustness or "
              "fairness, and not meant for decisions about people.", ""]
    if not all(item.reported for item in stored):
        lines.insert(-1, f"- Results measured on fewer than {MIN_IMAGES} images are marked so in the tables and "
                         "left out of the metadata's model-index: too few images for a figure to report.")
    if issubclass(family, zoo.PooledBackbone):
        lines.insert(-1, "- The built-in attention is class-agnostic: every class of an image gets the same map, "
                         "which says less on multi-label images.")
    lines += ["## Citation", "", "```bibtex", BIBTEX, "```", ""]
    return "\n".join(lines)


def _training(record: dict) -> str:
    """What a zoo-train run did, in words, from its record."""
    start = ("a random initialisation" if record["weights"] is None else
             f"[{record['base_model']}](https://huggingface.co/{record['base_model']})" if record["base_model"] else
             f"`{record['weights']}` (SHA-256 `{record['weights_sha256']}`)")
    trained = "the backbone frozen as it started, the rest trained" if record["freeze_backbone"] else "all trained"
    return (f"`zoo-train` recipe `{record['recipe']}`, {record['epochs']} epoch(s) ({record['steps']} steps) on "
            f"{record['train_images']} training images ({dataset_names(record['dataset'], record['classes'])[1]}) "
            f"at {record['image_size']} px, from {start}; {trained}; licence {record['license']}")


def _merged(data: ModelCardData, existing: ModelCard | None) -> ModelCardData:
    """``data`` over the existing card's front matter: its other keys and tags stay, its model-index goes."""
    if existing is None:
        return data
    old, new = existing.data.to_dict(), data.to_dict()
    old.pop("model-index", None)
    tags = list(dict.fromkeys([*new.get("tags", []), *old.get("tags", [])]))
    return ModelCardData(**{**old, **new, "tags": tags})


def write_card(folder: Path, name: str, repo_id: str | None = None, base_model: str | None = None,
               existing: ModelCard | None = None) -> ModelCard:
    """Write ``folder/README.md`` from the folder's results (and ``config.json``) for checkpoint ``name``.

    ``existing``: the card to update (default: ``folder/README.md`` if there is one); its front matter is kept
    but for what the generator writes, and its ``base_model`` is kept unless another is given.
    """
    folder = Path(folder)
    if existing is None and (folder / "README.md").is_file():
        existing = ModelCard.load(folder / "README.md")
    info = ModelInfo.of(folder, name)
    model = info.meta_model()
    stored = read_results(folder, info)
    if base_model is None:
        base_model = info.training["base_model"] if info.training is not None else declared_base_model(name)
    trained_on = info.training_data(name)
    entries = eval_results(stored)
    data = ModelCardData(
        library_name="timm", license=info.license() or (existing and existing.data.license) or "unknown",
        tags=["image-classification", "timm", "interpretability", "saliency", FAMILIES[_family(model)][0],
              "interpretable-zoo"],
        datasets=None if trained_on is None else [trained_on.hub_id], base_model=base_model,
        pipeline_tag="image-classification", model_name=name if entries else None, eval_results=entries or None,
    )
    body = card_body(name, info, model, stored, repo_id or hub_id(name), base_model)
    card = ModelCard(f"---\n{_merged(data, existing).to_yaml()}\n---\n\n{body}")
    (create_card_folder(folder) / "README.md").write_text(str(card))
    return card


def regenerate(root: Path) -> list[Path]:
    """Rewrite every card under ``root``: one per registered tag (``no results yet`` where there are none) and
    one per other folder there. Returns the card folders."""
    names = set(zoo.list_models(pretrained=True)) | {p.name for p in root.glob("*") if p.is_dir()}
    folders = [inside(root, name, "card name") for name in sorted(names)]
    for folder in folders:
        write_card(folder, folder.name)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoo-card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="the checkpoint, <arch>.<tag> (e.g. resnet50_castream.in1k)")
    parser.add_argument("--results", nargs="+", type=Path, default=[], help="zoo-eval results.json files to add")
    parser.add_argument("--all", action="store_true", help="regenerate every card")
    parser.add_argument("--root", type=Path, help=f"the cards' folder, created if need be (default: {CARDS_DIR}/ in "
                                                  "the working directory, which must exist)")
    args = parser.parse_args(argv)
    if args.all == (args.name is not None):
        parser.error("give a checkpoint name or --all")
    if args.root is None and not CARDS_DIR.is_dir():
        parser.error(f"no {CARDS_DIR}/ in the working directory {Path.cwd()}: run from the repository's root or "
                     "give --root")
    args.root = args.root or CARDS_DIR
    if args.all:
        if args.results:
            parser.error("--results goes with a checkpoint name")
        print(f"regenerated {len(regenerate(args.root))} cards in {args.root}")
        return
    folder = inside(args.root, args.name, "card name")
    add_results(folder, args.results, args.name)
    write_card(folder, args.name)
    print(f"card in {folder / 'README.md'}")


if __name__ == "__main__":
    main()
