"""Dataset readers on real on-disk layouts built in tmp_path (tests/data_layouts.py)."""

import gzip
import re

import numpy as np
import pytest
import torch
from data_layouts import CUB_CLASSES, CUB_IMAGES, make_cub, make_fashion_mnist, make_image_folder, make_voc, write_idx
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from zoo.data import (
    CUB200,
    DATASETS,
    VOC2012,
    VOC_CLASSES,
    FashionMNIST,
    FashionMNISTFiles,
    FashionMNISTIdx,
    ImageFolderDataset,
    box_share,
    build_dataset,
    classification,
    collate,
    dataset_images,
    find_fashion_mnist,
    sanitize_boxes,
)
from zoo.data.transforms import eval_transform

SPLITS = {"imagenet-folder": "val", "cub": "train", "voc": "train", "cifar100": "train", "fashion-mnist": "test",
          "fashion-mnist-idx": "test", "fashion-canvas": "test", "fashion-canvas-multi": "train"}  # fmt: skip
TO_TENSOR = v2.Compose([v2.Resize((32, 48)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def replace_line(path, number, text=None):
    """Line ``number`` (1-based) of ``path`` replaced by ``text``, deleted if None, appended past the end."""
    lines = path.read_text().splitlines()
    lines[number - 1 : number] = [] if text is None else [text]
    path.write_text("".join(f"{line}\n" for line in lines))


def replace_text(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def white_extent(image: torch.Tensor) -> list[int]:
    """XYXY extent of the white pixels of an image tensor [C, H, W] (uint8)."""
    ys, xs = (image.float().mean(0) > 128).nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_cub_labels_classes_boxes_and_split(tmp_path):
    make_cub(tmp_path)
    train, test = CUB200(tmp_path, "train"), CUB200(tmp_path, "test")
    assert train.classes == list(CUB_CLASSES) == test.classes
    assert (len(train), len(test)) == (3, 1)
    expected = [(0, [24, 16, 72, 48]), (2, [10, 5, 40, 45]), (1, [60, 30, 80, 50])]  # ids 1, 3, 4: x, y, x+w, y+h
    for (image, target), (label, box) in zip(train, expected, strict=True):
        assert target["label"] == label
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
        assert target["boxes"].tolist() == [box] and target["boxes"].canvas_size == (64, 96) == image.size[::-1]
        assert target["box_labels"].tolist() == [label] and target["box_labels"].dtype == torch.int64
        assert white_extent(v2.functional.pil_to_tensor(image)) == box  # the box lies on the drawn rectangle
    assert test[0][1]["label"] == 1 and test[0][1]["boxes"].tolist() == [[0, 0, 96, 64]]


def test_voc_boxes_multi_hot_labels_and_difficult_flags(tmp_path):
    make_voc(tmp_path)
    keep, drop = VOC2012(tmp_path, "train"), VOC2012(tmp_path, "train", difficult="drop")
    assert keep.classes == VOC_CLASSES and len(VOC_CLASSES) == 20 and VOC_CLASSES[11] == "dog"
    dog, cat = VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")
    image, target = keep[0]
    assert target["boxes"].tolist() == [[24, 16, 48, 32]]  # xmin 25 ymin 17 xmax 48 ymax 32, 1-based inclusive
    assert white_extent(v2.functional.pil_to_tensor(image)) == [24, 16, 48, 32]
    _, target = keep[1]
    assert target["boxes"].tolist() == [[0, 0, 20, 20], [60, 30, 96, 64], [29, 39, 50, 60]]
    assert target["box_labels"].tolist() == [dog, cat, dog] and target["difficult"].tolist() == [False, True, True]
    assert target["label"].dtype == torch.float32 and target["label"].nonzero().flatten().tolist() == [cat, dog]
    _, target = drop[1]  # the cat is only difficult: dropped, so labelled 0
    assert target["boxes"].tolist() == [[0, 0, 20, 20]] and target["difficult"].tolist() == [False]
    assert target["label"].nonzero().flatten().tolist() == [dog]
    _, target = VOC2012(tmp_path, "val")[0]  # float coordinates, as a few VOC 2012 annotations have
    assert torch.allclose(target["boxes"], torch.tensor([[10, 10.5, 40, 45.7], [49, 4, 90, 30]]))


def test_splits_select_their_images(tmp_path):
    make_voc(tmp_path / "voc")
    assert [len(VOC2012(tmp_path / "voc", split)) for split in ("train", "val", "trainval")] == [2, 1, 3]
    make_image_folder(tmp_path / "in", per_class=3, splits=("train",))
    make_image_folder(tmp_path / "in", per_class=1, splits=("val",))
    train, val = ImageFolderDataset(tmp_path / "in", "train"), ImageFolderDataset(tmp_path / "in", "val")
    assert (len(train), len(val)) == (6, 2) and val.classes == ["n01440764", "n01443537"]
    assert [target["label"] for _, target in val] == [0, 1]
    _, target = val[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].canvas_size == (64, 96)
    assert target["box_labels"].shape == (0,)


@pytest.mark.parametrize("dataset", ["cub", "voc"])
def test_boxes_follow_joint_flip_crop_and_resize(tmp_path, dataset):
    flip, crop, resize = v2.RandomHorizontalFlip(p=1.0), v2.RandomCrop((48, 64)), v2.Resize((24, 32))
    transforms = v2.Compose([flip, crop, resize, v2.ToImage()])
    make_cub(tmp_path) if dataset == "cub" else make_voc(tmp_path)
    data = build_dataset(dataset, tmp_path, "train", transforms)
    indices = range(len(data)) if dataset == "cub" else [0]  # VOC image 0 has a single object
    for index in indices:
        for _ in range(4):
            image, target = data[index]
            assert image.shape == (3, 24, 32) and target["boxes"].canvas_size == (24, 32)
            assert torch.allclose(torch.tensor(white_extent(image)).float(), target["boxes"][0], atol=1)


def test_sanitize_boxes_drops_emptied_boxes_with_their_labels_and_flags(tmp_path):
    make_voc(tmp_path)
    data = VOC2012(tmp_path, "train", v2.Compose([v2.CenterCrop((32, 32)), sanitize_boxes()]))
    _, target = data[1]  # crop x in [32, 64), y in [16, 48): the first dog falls out
    assert target["boxes"].tolist() == [[28, 14, 32, 32], [0, 23, 18, 32]]
    assert target["box_labels"].tolist() == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")]
    assert target["difficult"].tolist() == [True, True]


def test_collate_stacks_images_and_labels_and_keeps_boxes_as_lists(tmp_path):
    make_voc(tmp_path / "voc")
    make_cub(tmp_path / "cub")
    images, target = next(iter(DataLoader(VOC2012(tmp_path / "voc", "train", TO_TENSOR), 2, collate_fn=collate)))
    assert images.shape == (2, 3, 32, 48) and target["label"].shape == (2, 20)
    assert [boxes.shape for boxes in target["boxes"]] == [(1, 4), (3, 4)]
    assert [flags.tolist() for flags in target["difficult"]] == [[False], [False, True, True]]
    images, target = next(iter(DataLoader(CUB200(tmp_path / "cub", "train", TO_TENSOR), 3, collate_fn=collate)))
    assert images.shape == (3, 3, 32, 48) and target["label"].tolist() == [0, 2, 1]
    assert target["label"].dtype == torch.int64 and len(target["boxes"]) == len(target["box_labels"]) == 3


def test_fashion_mnist_from_gzipped_idx_files_as_debian_ships_them(tmp_path):
    arrays = make_fashion_mnist(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]  # fmt: skip
    for split in ("train", "test"):
        data = build_dataset("fashion-mnist-idx", tmp_path, split)
        images, labels = arrays[split]
        assert len(data) == len(labels) and data.classes[0] == "T-shirt/top" and len(data.classes) == 10
        for index in (0, len(data) - 1):
            image, target = data[index]
            assert image.mode == "L" and np.array_equal(np.asarray(image), images[index])
            assert target["label"] == labels[index] and target["boxes"].canvas_size == (28, 28)


def test_fashion_mnist_through_torchvision_from_its_raw_folder(tmp_path):
    arrays = make_fashion_mnist(tmp_path / "FashionMNIST" / "raw", compressed=False)
    data = FashionMNIST(tmp_path, "test")
    images, labels = arrays["test"]
    assert len(data) == len(labels) and [data[i][1]["label"] for i in range(len(data))] == labels.tolist()
    assert np.array_equal(np.asarray(data[2][0]), images[2])


def test_fashion_mnist_idx_errors(tmp_path):
    missing = re.escape(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=f"{missing} not found.*apt-get install dataset-fashion-mnist"):
        FashionMNISTIdx(tmp_path / "none", "train")
    make_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz not found"):
        FashionMNISTIdx(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="do not pair up"):
        FashionMNISTIdx(tmp_path, "test")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03"))  # idx of floats
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not an idx file of unsigned bytes"):
        FashionMNISTIdx(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not a complete gzip file"):
        FashionMNISTIdx(tmp_path, "train")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()  # falls back on the uncompressed file, here truncated
    (tmp_path / "train-images-idx3-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: 1567 bytes of data for the shape \(2, 28, 28\)"):
        FashionMNISTIdx(tmp_path, "train")


def test_find_fashion_mnist_in_a_folder_the_debian_package_or_torchvision(tmp_path, monkeypatch):
    assert find_fashion_mnist(tmp_path / "given") == FashionMNISTFiles(str(tmp_path / "given"), "idx")
    debian = tmp_path / "debian"
    monkeypatch.setattr(classification, "FASHION_MNIST_DEBIAN_DIR", debian)
    monkeypatch.setattr(classification.shutil, "which", lambda command: None)  # no apt here
    downloaded = []
    monkeypatch.setattr(classification, "FashionMNIST", lambda root, split, download: downloaded.append((root, split)))
    files = find_fashion_mnist(download_root=tmp_path / "data")
    assert files == (str(tmp_path / "data"), "torchvision") and files.dataset == "fashion-mnist"
    assert downloaded == [(tmp_path / "data", "train"), (tmp_path / "data", "test")]
    installs = []
    monkeypatch.setattr(classification.shutil, "which", lambda command: f"/usr/bin/{command}")
    monkeypatch.setattr(classification.subprocess, "run", lambda command, check: installs.append(command))
    find_fashion_mnist(download_root=tmp_path / "data")
    assert not installs  # apt only when asked
    find_fashion_mnist(download_root=tmp_path / "data", install=True)
    assert installs[0][-4:] == ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    make_fashion_mnist(debian)
    files = find_fashion_mnist(install=True)
    assert files == (str(debian), "idx") and files.dataset == "fashion-mnist-idx"
    assert len(build_dataset(files.dataset, files.root, "test")) == 4 and len(downloaded) == 6 and len(installs) == 1


def test_dataset_images_are_preprocessed_for_the_data_config(tmp_path):
    make_cub(tmp_path)
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.5, 0.4, 0.3),
              "std": (0.2, 0.3, 0.4)}
    images, targets = dataset_images("cub", tmp_path, config, [0, 2], split="train")
    data = CUB200(tmp_path, "train", eval_transform(config))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    for position, index in enumerate([0, 2]):
        image, target = data[index]
        assert torch.equal(images[position], image) and torch.equal(targets[position]["boxes"], target["boxes"])
    with pytest.raises(ValueError, match=r"indices must be 1 or more of the 3 samples of CUB200 train, got \[0, 3\]"):
        dataset_images("cub", tmp_path, config, [0, 3], split="train")


def test_box_share_is_the_mean_share_of_the_image_its_box_covers(tmp_path):
    make_cub(tmp_path)
    data = CUB200(tmp_path, "train")  # images 1, 3, 4 of CUB_IMAGES, 96x64 each
    shares = [48 * 32 / (96 * 64), 30 * 40 / (96 * 64), 20 * 20 / (96 * 64)]  # CUB boxes: x, y, width, height
    assert box_share(data) == pytest.approx(sum(shares) / 3)
    assert box_share(data, [0, 2]) == pytest.approx((shares[0] + shares[2]) / 2)
    assert box_share(CUB200(tmp_path, "test")) == 1  # a box over the whole image
    for indices in ([], [0, 3]):
        with pytest.raises(ValueError, match="indices must be 1 or more of the 3 samples of CUB200 train"):
            box_share(data, indices)
    make_voc(tmp_path / "voc")
    with pytest.raises(ValueError, match="sample 1 has 3 boxes: a box share needs exactly one per image"):
        box_share(VOC2012(tmp_path / "voc", "train"))


@pytest.mark.parametrize("name", DATASETS)
def test_missing_root_names_the_path_and_the_layout(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))}.*expect") as error:
        build_dataset(name, missing, SPLITS[name])
    assert DATASETS[name].layout in str(error.value)


@pytest.mark.parametrize("name", DATASETS)
def test_unknown_split(tmp_path, name):
    with pytest.raises(ValueError, match=f"unknown split 'validation' for {DATASETS[name].__name__}"):
        build_dataset(name, tmp_path, "validation")


def test_build_dataset_names_and_errors(tmp_path):
    make_cub(tmp_path)
    assert isinstance(build_dataset("cub", tmp_path, "test"), CUB200)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*imagenet-folder, cub, voc, cifar100, fashion"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="'cub' cannot be downloaded.*cifar100, fashion-mnist"):
        build_dataset("cub", tmp_path, "train", download=True)
    with pytest.raises(ValueError, match="difficult='ignore'"):
        build_dataset("voc", tmp_path, "train", difficult="ignore")


@pytest.mark.parametrize("file", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
                                  "classes.txt"])  # fmt: skip
def test_cub_missing_file(tmp_path, file):
    (make_cub(tmp_path) / file).unlink()
    with pytest.raises(FileNotFoundError, match=f"CUB_200_2011/{file} not found; CUB200 expects .*CUB_200_2011/"):
        CUB200(tmp_path, "train")


@pytest.mark.parametrize(
    ("file", "number", "text", "message"),
    [
        ("images.txt", 2, "2 a.jpg b.jpg", "images.txt:2: expected 2 columns, found 3"),
        ("images.txt", 3, "1 again.jpg", "images.txt:3: id 1 already given at .*images.txt:1"),
        ("classes.txt", 1, "1 001.Black footed", "classes.txt:1: expected 2 columns"),
        ("bounding_boxes.txt", 5, "99 1 1 1 1", "bounding_boxes.txt:5: unknown image id 99"),
        ("bounding_boxes.txt", 3, "3 10 five 30 40", "bounding_boxes.txt:3: 'five' is not a valid float"),
        ("bounding_boxes.txt", 2, "2 0 0 96", "bounding_boxes.txt:2: expected 5 columns, found 4"),
        ("image_class_labels.txt", 1, "1 7", "image_class_labels.txt:1: class id 7 is not in classes.txt"),
        ("image_class_labels.txt", 2, "x 1", "image_class_labels.txt:2: 'x' is not a valid int"),
        ("train_test_split.txt", 2, "2 2", "train_test_split.txt:2: the split flag must be 1"),
        ("train_test_split.txt", 4, None, r"train_test_split.txt: no line for the image ids \[4\]"),
    ],
)
def test_cub_malformed_lines(tmp_path, file, number, text, message):
    replace_line(make_cub(tmp_path) / file, number, text)
    with pytest.raises(ValueError, match=message):
        CUB200(tmp_path, "train")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 24 16 -5 32", r"bounding_boxes.txt:1: box \[24.0, 16.0, 19.0, 48.0\] has a negative width"),
        ("1 24 16 80 32", r"bounding_boxes.txt:1: box \[24.0, 16.0, 104.0, 48.0\] lies outside the 96x64 image"),
        ("1 -1 16 20 32", "bounding_boxes.txt:1: box .* lies outside"),
    ],
)
def test_cub_bad_box_is_named_when_its_image_is_read(tmp_path, text, message):
    replace_line(make_cub(tmp_path) / "bounding_boxes.txt", 1, text)
    data = CUB200(tmp_path, "train")
    data[1]
    with pytest.raises(ValueError, match=message):
        data[0]


def test_cub_missing_image_names_the_listing_line(tmp_path):
    folder = make_cub(tmp_path)
    next((folder / "images" / CUB_CLASSES[CUB_IMAGES[0].class_id - 1]).iterdir()).unlink()
    message = r"Black_footed_Albatross_0001_1001.jpg not found \(listed at .*images.txt:1\)"
    with pytest.raises(FileNotFoundError, match=message):
        CUB200(tmp_path, "train")[0]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("<xmax>48</xmax>", "<xmax>97</xmax>", r"2008_000008.xml, object 1: box \[24.0, 16.0, 97.0, 32.0\] lies out"),
        ("<xmin>25</xmin>", "<xmin>0</xmin>", r"2008_000008.xml, object 1: box \[-1.0, .* lies outside"),
        ("<xmax>48</xmax>", "<xmax>20</xmax>", "2008_000008.xml, object 1: box .* negative width"),
        ("<name>dog</name>", "<name>unicorn</name>", "2008_000008.xml, object 1: unknown class 'unicorn'"),
        ("<xmin>25</xmin>", "<xmin>25px</xmin>", "2008_000008.xml, object 1, xmin: '25px' is not a valid float"),
        ("<difficult>0</difficult>", "<difficult>yes</difficult>", "object 1, difficult: 'yes' is not a valid int"),
        ("<annotation>", '<!DOCTYPE a [<!ENTITY e "e">]>\n<annotation>', "2008_000008.xml: refused"),
        ("</annotation>", "", "2008_000008.xml: malformed XML"),
    ],
)
def test_voc_bad_annotation(tmp_path, old, new, message):
    replace_text(make_voc(tmp_path) / "Annotations" / "2008_000008.xml", old, new)
    data = VOC2012(tmp_path, "train")
    data[1]
    with pytest.raises(ValueError, match=message):
        data[0]


def test_voc_layout_errors(tmp_path):
    folder = make_voc(tmp_path)
    (folder / "Annotations" / "2008_000015.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"2008_000015.xml not found \(listed at .*Main/train.txt:2\)"):
        VOC2012(tmp_path, "train")[1]
    (folder / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Main/val.txt not found; VOC2012 expects .*VOCdevkit/VOC2012"):
        VOC2012(tmp_path, "val")
    replace_line(folder / "ImageSets" / "Main" / "trainval.txt", 2, "2008_000015 1")
    with pytest.raises(ValueError, match="trainval.txt:2: expected 1 columns, found 2"):
        VOC2012(tmp_path, "trainval")
