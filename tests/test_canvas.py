"""Fashion-MNIST canvases (zoo/data/canvas.py) on tiny idx files built in tmp_path (tests/data_layouts.py)."""

import gzip
import hashlib
import re

import numpy as np
import pytest
import torch
from data_layouts import make_fashion_mnist, write_idx
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from zoo.data import DATASETS, FashionCanvas, FashionCanvasMulti, build_dataset, collate

COUNTS = {"train": 12, "test": 8}


def garment(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 item: a blob of non-zero pixels inside margins of 1-7 pixels, different on each side."""
    item = np.zeros((28, 28), np.uint8)
    top, left, bottom, right = rng.integers(1, 8, 4)
    rows, cols = np.mgrid[0 : 28 - top - bottom, 0 : 28 - left - right]
    body = rng.integers(40, 256, rows.shape, dtype=np.uint8)
    notch = (rows < rows.shape[0] // 3) & (np.abs(cols - cols.shape[1] // 2) < cols.shape[1] // 6)  # a neckline
    item[top : 28 - bottom, left : 28 - right] = np.where(notch, 0, body)
    return item


@pytest.fixture
def fashion_root(tmp_path):
    """Tiny Fashion-MNIST idx files (the Debian layout) whose items have zero margins, so the tight box of an item
    is smaller than its square; labels cycle through the 10 classes. The arrays by split are ``root.arrays``."""
    make_fashion_mnist(tmp_path, **COUNTS)
    rng = np.random.default_rng(1)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = np.stack([garment(rng) for _ in range(COUNTS[split])])
        labels = (np.arange(COUNTS[split]) * 3 % 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[split] = images, labels
    return tmp_path, arrays


def extent(mask: np.ndarray) -> list[int]:
    """XYXY extent of the True pixels (x2, y2 one past the last), computed independently of the module."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def grey(image) -> np.ndarray:
    array = np.asarray(image)
    assert array.shape[2] == 3 and (array == array[:, :, :1]).all()
    return array[:, :, 0]


def digest(data, indices) -> list[str]:
    return [hashlib.sha256(np.asarray(data[i][0]).tobytes() + data[i][1]["boxes"].numpy().tobytes()).hexdigest()
            for i in indices]  # fmt: skip


def test_sample_format_counts_and_names(fashion_root):
    root, arrays = fashion_root
    data = build_dataset("fashion-canvas", root, "train")
    assert isinstance(data, FashionCanvas) and len(data) == COUNTS["train"] and len(data.classes) == 10
    image, target = data[3]
    assert image.mode == "RGB" and image.size == (96, 96)
    assert isinstance(target["label"], int) and target["label"] == arrays["train"][1][3]  # canvas i: item i
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
    assert target["boxes"].shape == (1, 4) and target["boxes"].canvas_size == (96, 96)
    assert target["box_labels"].tolist() == [target["label"]]
    multi = build_dataset("fashion-canvas-multi", root, "test", size=64, count=5, seed=3)
    assert isinstance(multi, FashionCanvasMulti) and len(multi) == 5 and multi[4][0].size == (64, 64)
    assert multi[0][1]["label"].dtype == torch.float32 and multi[0][1]["label"].shape == (10,)
    assert set(DATASETS) >= {"fashion-canvas", "fashion-canvas-multi"}
    with pytest.raises(IndexError):
        data[len(data)]
    assert len(list(build_dataset("fashion-canvas", root, "test", count=3))) == 3


def test_same_seed_same_bytes_in_any_order_and_process(fashion_root):
    root, _ = fashion_root
    indices = range(COUNTS["test"])
    first = digest(FashionCanvasMulti(root, "test", seed=7), indices)
    again = FashionCanvasMulti(root, "test", seed=7)
    assert digest(again, reversed(indices))[::-1] == first
    loader = DataLoader(FashionCanvasMulti(root, "test", v2.ToImage(), seed=7), batch_size=3, num_workers=2,
                        collate_fn=lambda batch: batch)  # fmt: skip
    in_workers = [hashlib.sha256(image.permute(1, 2, 0).numpy().tobytes() + target["boxes"].numpy().tobytes())
                  .hexdigest() for batch in loader for image, target in batch]  # fmt: skip
    assert in_workers == first
    other_seed = digest(FashionCanvasMulti(root, "test", seed=8), indices)
    assert all(a != b for a, b in zip(first, other_seed, strict=True))
    other_split = digest(FashionCanvasMulti(root, "train", seed=7), indices)
    assert all(a != b for a, b in zip(first, other_split, strict=True))
    assert len(set(first)) == len(first)
    places = {split: [FashionCanvas(root, split, seed=7).scene(i).objects[0][2:5] for i in range(8)]
              for split in ("train", "test")}  # fmt: skip
    assert places["train"] != places["test"]  # the split seeds the draws, not only the items


@pytest.mark.parametrize("split", ["train", "test"])
def test_items_of_the_split_placed_exactly_at_their_own_size(fashion_root, split):
    """At size 56 and scale 0.5 an item keeps its 28 pixels: the canvas holds it exactly where the scene says,
    and the box is the item's own tight box moved there."""
    root, arrays = fashion_root
    images, labels = arrays[split]
    data = FashionCanvas(root, split, size=56, scale=(0.5, 0.5), count=2 * COUNTS[split])
    for index in range(len(data)):
        scene = data.scene(index)
        (obj,) = scene.objects
        item = images[index % COUNTS[split]]
        assert obj.item == index % COUNTS[split] and obj.label == labels[obj.item] and obj.side == 28
        placed = scene.pixels[obj.y : obj.y + 28, obj.x : obj.x + 28]
        assert np.array_equal(placed[item > 0], item[item > 0])
        x1, y1, x2, y2 = extent(item > 0)
        assert list(obj.box) == [obj.x + x1, obj.y + y1, obj.x + x2, obj.y + y2]
        assert data[index][1]["boxes"].tolist() == [list(obj.box)]


@pytest.mark.parametrize("name", ["fashion-canvas", "fashion-canvas-multi"])
def test_boxes_are_the_tight_boxes_of_the_objects_pixels(fashion_root, name):
    """Without clutter the non-zero pixels are the objects': inside each box they reach all four sides (a box one
    pixel too large fails), and none lies outside the boxes (a box one pixel too small fails)."""
    root, _ = fashion_root
    for split in ("train", "test"):
        for size in (64, 96):
            data = build_dataset(name, root, split, size=size, clutter=0, count=20)
            for index in range(len(data)):
                image, target = data[index]
                pixels = grey(image)
                outside = pixels > 0
                boxes = target["boxes"].to(torch.int64).tolist()
                assert (target["boxes"] == torch.tensor(boxes, dtype=torch.float32)).all()  # whole pixels
                for x1, y1, x2, y2 in boxes:
                    assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
                    inside = np.zeros_like(outside)
                    inside[y1:y2, x1:x2] = True
                    assert extent(outside & inside) == [x1, y1, x2, y2]
                    outside[y1:y2, x1:x2] = False
                assert not outside.any()


@pytest.mark.parametrize("name", ["fashion-canvas", "fashion-canvas-multi"])
def test_clutter_is_there_and_never_alters_the_objects(fashion_root, name):
    root, _ = fashion_root
    clean = build_dataset(name, root, "train", count=24, clutter=0)
    cluttered = build_dataset(name, root, "train", count=24)
    with_clutter_outside = 0
    for index in range(len(clean)):
        (image, target), (plain, plain_target) = cluttered[index], clean[index]
        assert torch.equal(target["boxes"], plain_target["boxes"])  # the clutter's draws leave the objects alone
        pixels, objects = grey(image), grey(plain)
        assert np.array_equal(pixels[objects > 0], objects[objects > 0])
        assert (pixels >= objects).all()  # nothing of the objects erased; clutter only adds
        outside = np.ones_like(pixels, dtype=bool)
        for x1, y1, x2, y2 in target["boxes"].to(torch.int64).tolist():
            outside[y1:y2, x1:x2] = False
        with_clutter_outside += bool(pixels[outside].any())
        scene = cluttered.scene(index)
        assert 2 <= len(scene.fragments) <= 5
        assert all(fragment.item not in {obj.item for obj in scene.objects} for fragment in scene.fragments)
        assert all(fragment.gain < 256 and fragment.side < cluttered.size for fragment in scene.fragments)
    assert with_clutter_outside >= 0.8 * len(clean)


def test_multiple_objects_distinct_classes_apart_and_multi_hot(fashion_root):
    root, arrays = fashion_root
    for split in ("train", "test"):
        data = FashionCanvasMulti(root, split, count=30)
        counts = set()
        for index in range(len(data)):
            image, target = data[index]
            labels = target["box_labels"].tolist()
            counts.add(len(labels))
            assert len(labels) == len(set(labels)) == len(target["boxes"])
            assert torch.equal(target["label"], torch.zeros(10).index_fill_(0, target["box_labels"], 1.0))
            boxes = target["boxes"].tolist()
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = boxes[a], boxes[b]
                    assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1  # no overlap
            scene = data.scene(index)
            assert scene.objects[0].item == index % COUNTS[split]
            assert [arrays[split][1][obj.item] for obj in scene.objects] == labels
        assert counts == {2, 3}


def test_transforms_carry_the_boxes(fashion_root):
    root, _ = fashion_root
    plain = FashionCanvasMulti(root, "train", clutter=0, count=6)
    transforms = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Resize((48, 48)), v2.ToImage()])
    flipped = FashionCanvasMulti(root, "train", transforms, clutter=0, count=6)
    for index in range(len(plain)):
        _, before = plain[index]
        image, after = flipped[index]
        assert image.shape == (3, 48, 48) and after["boxes"].canvas_size == (48, 48)
        x1, y1, x2, y2 = before["boxes"].unbind(1)
        expected = torch.stack([96 - x2, y1, 96 - x1, y2], 1) / 2
        assert torch.allclose(after["boxes"], expected) and torch.equal(after["box_labels"], before["box_labels"])
        for box in after["boxes"]:  # each box still holds its object's pixels after the resampling
            bx1, by1, bx2, by2 = box.tolist()
            pixels = image[0, int(by1) : int(np.ceil(by2)), int(bx1) : int(np.ceil(bx2))]
            assert pixels.any() and pixels.float().mean() > 10
    images, target = next(iter(DataLoader(flipped, batch_size=4, collate_fn=collate)))
    assert images.shape == (4, 3, 48, 48) and target["label"].shape == (4, 10) and len(target["boxes"]) == 4


def test_sizes_scale_with_the_canvas_and_torchvision_layout(fashion_root, tmp_path):
    root, arrays = fashion_root
    small = FashionCanvas(root, "train", size=64, count=40)
    sides = [small.scene(index).objects[0].side for index in range(len(small))]
    assert 16 <= min(sides) and max(sides) <= 37 and small[0][0].size == (64, 64)
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (raw / name).write_bytes(gzip.decompress((root / f"{name}.gz").read_bytes()))  # torchvision's raw files
    through_torchvision = build_dataset("fashion-canvas", tmp_path / "tv", "train", source="torchvision")
    assert digest(through_torchvision, range(4)) == digest(FashionCanvas(root, "train"), range(4))


def test_errors(fashion_root, tmp_path):
    root, _ = fashion_root
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))} not found; FashionCanvas expects"):
        FashionCanvas(missing, "train")
    with pytest.raises(ValueError, match="unknown split 'val' for FashionCanvasMulti"):
        FashionCanvasMulti(root, "val")
    with pytest.raises(ValueError, match="needs source='torchvision'"):
        build_dataset("fashion-canvas", root, "train", download=True)
    bad = [({"size": 8}, "size=8"), ({"objects": 0}, "objects=0"), ({"objects": (3, 2)}, r"objects=\(3, 2\)"),
           ({"objects": 11}, "at most 10"), ({"seed": -1}, "seed=-1"), ({"source": "web"}, "source='web'"),
           ({"count": -2}, "count=-2"), ({"scale": (0.5, 0.2)}, "scale="), ({"clutter": -1}, "clutter=-1")]  # fmt: skip
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            FashionCanvas(root, "train", **options)


@pytest.mark.parametrize(("size", "scale"), [(48, (0.4, 0.5)), (32, (0.8, 1.0))])
def test_crowded_canvases_shrink_or_drop_objects_but_keep_them_apart_and_exact(fashion_root, size, scale):
    root, _ = fashion_root
    data = FashionCanvasMulti(root, "train", size=size, objects=3, scale=scale, clutter=0, count=40)
    shrunk, counts = 0, set()
    for index in range(len(data)):
        scene = data.scene(index)
        counts.add(len(scene.objects))
        shrunk += sum(obj.side < data.sides[0] for obj in scene.objects)
        assert scene.objects[0].item == index % COUNTS["train"] and scene.objects[0].side >= data.sides[0]
        for a, first in enumerate(scene.objects):
            x1, y1, x2, y2 = first.box
            assert extent(scene.pixels[y1:y2, x1:x2] > 0) == [0, 0, x2 - x1, y2 - y1]
            for second in scene.objects[a + 1 :]:
                ox1, oy1, ox2, oy2 = second.box
                assert x2 + 2 <= ox1 or ox2 + 2 <= x1 or y2 + 2 <= oy1 or oy2 + 2 <= y1  # GAP pixels apart
    assert (shrunk > 0 and counts == {3}) if size == 48 else min(counts) < 3  # 32: no room left for some
