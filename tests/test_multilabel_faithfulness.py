"""The explained class's probability: on a multi-label dataset the sigmoid of its logit, as the authors' code has it
(a VOC model is trained with binary cross-entropy per class), on a single-label one the softmax. AD, AG and AI of
harness runs against their definitions written out by hand from the same model's logits (thesis eq. 1.10, 2.8,
1.11); insertion and deletion against ``insertion_deletion`` with the same choice (its curves are checked against a
hand-written loop in test_metrics_curves.py)."""

import json
from dataclasses import replace

import pytest
import timm
import torch
from data_layouts import make_cub, make_voc
from safetensors.torch import load_file, save_file
from test_bad_input_harness import cub_protocol
from test_harness import CUB_TEST, FAST
from torch.utils.data import DataLoader

from zoo.data import build_dataset, collate
from zoo.data.transforms import eval_transform
from zoo.evaluation.harness import main
from zoo.evaluation.metrics import insertion_deletion
from zoo.evaluation.saliency import explain, mask_images, pixel_statistics

BY_HAND = {"softmax": lambda logits: logits.softmax(1), "sigmoid": torch.sigmoid}
DATASETS = {"voc": (make_voc, "trainval", 20), "cub": (lambda root: make_cub(root, images=CUB_TEST), "test", 3)}


def explained(model, dataset, probabilities):
    """p, o and the insertion and deletion areas of every explanation, in the harness' batches of 2: each positive
    class of a multi-hot label (else the label) explained by Grad-CAM, the image masked by its map in pixel space."""
    p, o, insertion, deletion = [], [], [], []
    for images, target in DataLoader(dataset, batch_size=2, collate_fn=collate):
        labels = target["label"]
        rows, classes = labels.nonzero(as_tuple=True) if labels.ndim == 2 else (torch.arange(len(labels)), labels)
        maps = explain(model, images[rows], "gradcam", classes)
        masked = mask_images(images[rows], maps, *pixel_statistics(model, images))
        with torch.no_grad():
            p.append(BY_HAND[probabilities](model(images))[rows, classes])
            o.append(BY_HAND[probabilities](model(masked))[torch.arange(len(rows)), classes])
        areas = insertion_deletion(model, images[rows], maps, classes, probabilities=probabilities)
        insertion.append(areas.insertion)
        deletion.append(areas.deletion)
    return torch.cat(p), torch.cat(o), torch.cat(insertion), torch.cat(deletion)


@pytest.mark.parametrize("name, flags, probabilities", [("voc", [], "sigmoid"),
                                                         ("voc", ["--probabilities", "softmax"], "softmax"),
                                                         ("cub", [], "softmax")])
def test_faithfulness_is_the_definition_by_hand(tmp_path, name, flags, probabilities):
    build, split, classes = DATASETS[name]
    build(tmp_path / "data")
    model = timm.create_model("resnet18", num_classes=classes).eval()
    with torch.no_grad():
        model.fc.weight.mul_(50)  # logits far apart: probabilities spread over (0, 1)
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    main(["resnet18", "--weights", str(tmp_path / "weights.safetensors"), "--dataset", name, "--data-root",
          str(tmp_path / "data"), "--split", split, "--methods", "gradcam", "--metrics", "faithfulness", "curves",
          *flags, "--out", str(tmp_path / "out"), *FAST])
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())

    dataset = build_dataset(name, tmp_path / "data", split)
    dataset.transforms = eval_transform(results["protocol"]["data_config"])
    p, o, insertion, deletion = explained(model, dataset, probabilities)
    # the p of every explanation (which SM and ADCC use too) is the one written out by hand
    recorded = torch.cat([load_file(path)["row/p"] for path in sorted((run_dir / "batches").iterdir())])
    assert torch.equal(recorded, p)
    assert 0 < p.min() and p.max() < 1 and ((p - o).abs() / p).max() > 1e-3  # measures something
    expected = {"AD": 100 * ((p - o).clamp(min=0) / p).mean(), "AG": 100 * ((o - p).clamp(min=0) / (1 - p)).mean(),
                "AI": 100 * (p < o).float().mean(), "I": 100 * insertion.mean(), "D": 100 * deletion.mean()}
    assert {key: results["methods"]["gradcam"][key] for key in expected} == {key: value.item()
                                                                            for key, value in expected.items()}
    assert results["protocol"]["probabilities"] == probabilities


def test_the_choice_is_part_of_the_protocol_key(tmp_path):
    protocol = cub_protocol(tmp_path, probabilities="softmax")
    assert len({replace(protocol, probabilities=choice).key() for choice in ("softmax", "sigmoid", None)}) == 3
