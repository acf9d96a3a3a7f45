"""Decoding and augmenting on the device (zoo.data.device): the workers' samples on the same seeds, boxes included,
in training (resume, processes) and evaluation, and the documented behaviour on files the device cannot decode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_layouts import CubImage, make_cub, make_fashion_mnist, make_image_folder, make_voc
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

import zoo  # noqa: F401
from zoo.data import CUB200, VOC2012, ImageFolderDataset, build_dataset, collate
from zoo.data import device as device_module
from zoo.data.device import DeviceTransforms, EncodedBatch, EncodedImage, decoding_transforms, jpeg_decoder
from zoo.data.photo import photo
from zoo.data.transforms import eval_transform, train_transform
from zoo.training.config import load_recipe
from zoo.training.train import SeededAugmentation, build_datasets, build_loaders

CONFIG = dict(input_size=(3, 64, 64), interpolation="bilinear", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
              std=(0.229, 0.224, 0.225))
CPU = torch.device("cpu")


def write_photos(root: Path) -> Path:
    """An ImageNet-style folder of photographs of several sizes: RGB JPEGs, a greyscale JPEG, a CMYK JPEG and a
    PNG named .JPEG (ImageNet's train split holds both kinds)."""
    base = photo()
    for split in ("train", "val"):
        for index in range(6):
            folder = root / split / f"n0{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            image = base.resize((500 - 37 * index, 375 + 11 * index)).rotate(9 * index)
            image = {3: image.convert("L"), 4: image.convert("CMYK")}.get(index, image)
            image.save(folder / f"{index}.JPEG", format="PNG" if index == 5 else "JPEG", quality=90)
    return root


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    """Each JPEG library the device path can decode with."""
    monkeypatch.setattr(device_module, "jpeg_decoder", lambda: jpeg_decoder(request.param))
    return request.param


def drawn(dataset, index: int, seed: int = 0):
    """Sample ``index`` as training draws it at epoch 0 (``SeededAugmentation``)."""
    return SeededAugmentation(dataset, seed)[index]


def on_device(dataset):
    """``dataset`` with its transforms moved to the device path."""
    dataset.transforms = DeviceTransforms(dataset.transforms)
    dataset.defer_decoding()
    return dataset


def batch_of(sample) -> torch.Tensor:
    return collate([sample])[0].to(CPU)[0]


@pytest.mark.parametrize("augmentation", ["imagenet", "none"])
def test_device_path_gives_the_workers_samples_on_the_same_seeds(tmp_path, augmentation, decoder):
    root = write_photos(tmp_path)
    workers = ImageFolderDataset(root, "train", train_transform(CONFIG, augmentation))
    device = on_device(ImageFolderDataset(root, "train", train_transform(CONFIG, augmentation)))
    flips = set()
    for index in range(len(workers)):
        image, target = drawn(workers, index)
        encoded, device_target = drawn(device, index)
        assert isinstance(encoded, EncodedImage)
        awaits_device = Path(encoded.path).stem in ("0", "1", "2", "3")  # not the CMYK JPEG, nor the PNG
        assert (encoded.pixels is None) == awaits_device, "only complete RGB/grey JPEGs await the device"
        torch.testing.assert_close(batch_of((encoded, device_target)), image, rtol=0, atol=0)
        assert device_target["label"] == target["label"]
        flips.add(any(name == "horizontal_flip" for name, _ in encoded.operations))
    if augmentation == "imagenet":
        assert flips == {True, False}, "the seeds should flip some images and not others"


@pytest.mark.parametrize("augmentation", ["imagenet", "none"])
def test_boxes_follow_the_image_on_the_device_path(tmp_path, augmentation):
    root = make_cub(tmp_path)
    workers = CUB200(tmp_path, "train", train_transform(CONFIG, augmentation))
    device = on_device(CUB200(tmp_path, "train", train_transform(CONFIG, augmentation)))
    assert root.is_dir() and len(workers) == 3
    for seed in range(4):
        for index in range(len(workers)):
            image, target = drawn(workers, index, seed)
            encoded, device_target = drawn(device, index, seed)
            torch.testing.assert_close(batch_of((encoded, device_target)), image, rtol=0, atol=0)
            assert isinstance(device_target["boxes"], tv_tensors.BoundingBoxes)
            assert device_target["boxes"].canvas_size == target["boxes"].canvas_size == (64, 64)
            torch.testing.assert_close(device_target["boxes"], target["boxes"], rtol=0, atol=0)


def test_evaluation_boxes_are_clipped_and_kept_on_the_device_path(tmp_path):
    make_voc(tmp_path)
    workers = VOC2012(tmp_path, "trainval", eval_transform(CONFIG))
    device = on_device(VOC2012(tmp_path, "trainval", eval_transform(CONFIG)))
    loaders = [DataLoader(data, batch_size=2, collate_fn=collate) for data in (workers, device)]
    for (images, target), (encoded, device_target) in zip(*loaders, strict=True):
        assert isinstance(encoded, EncodedBatch)
        torch.testing.assert_close(encoded.to(CPU), images, rtol=0, atol=0)
        for key in ("label", "boxes", "box_labels", "difficult"):
            torch.testing.assert_close(device_target[key], target[key], rtol=0, atol=0)


def test_a_transform_the_device_cannot_run_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="RandomCrop cannot run on the device"):
        DeviceTransforms(train_transform(CONFIG, "cifar"))
    make_image_folder(tmp_path)
    make_fashion_mnist(tmp_path / "fashion")
    data = build_dataset("fashion-canvas", tmp_path / "fashion", "train", count=4)
    with pytest.raises(ValueError, match="decode: device is impossible here: FashionCanvas does not read image files"):
        decoding_transforms("device", data, eval_transform(CONFIG), CPU)
    folder, gpu = ImageFolderDataset(tmp_path, "train"), torch.device("cuda")  # only its type is read
    assert isinstance(decoding_transforms("auto", folder, eval_transform(CONFIG), gpu), DeviceTransforms)
    assert folder.encoded
    for device, transforms in ((CPU, eval_transform(CONFIG)), (gpu, train_transform(CONFIG, "cifar"))):
        assert isinstance(decoding_transforms("auto", folder, transforms, device), v2.Compose)
        assert not folder.encoded
    with pytest.raises(ValueError, match="decode 'gpu' is not one of auto, workers, device"):
        decoding_transforms("gpu", folder, eval_transform(CONFIG), CPU)
    with pytest.raises(ValueError, match="decode 'gpu' is not one of"):
        load_recipe("castream_imagenet", decode="gpu")


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bad_huffman_table(path: Path) -> Path:
    """A JPEG whose header parses and which ends as a JPEG ends, but whose Huffman table the decoder refuses."""
    data = bytearray(path.read_bytes())
    table = data.index(b"\xff\xc4") + 5  # after the marker, the length and the table's class/id byte
    data[table:table + 16] = b"\xff" * 16  # code counts no Huffman table can have
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", [truncated, bad_huffman_table])
def test_a_corrupt_jpeg_stops_both_paths_with_an_error_naming_it(tmp_path, damage, decoder):
    make_image_folder(tmp_path, per_class=3)
    bad = damage(tmp_path / "train" / "n01443537" / "n01443537_1.JPEG")
    workers = ImageFolderDataset(tmp_path, "train", eval_transform(CONFIG))
    device = on_device(ImageFolderDataset(tmp_path, "train", eval_transform(CONFIG)))
    index = [path for path, _ in workers.source.samples].index(str(bad))
    with pytest.raises(OSError, match=f"could not decode the image {bad}"):
        workers[index]
    with pytest.raises(OSError, match=f"could not decode the image {bad}"):
        for images, _ in DataLoader(device, batch_size=3, collate_fn=collate):
            images.to(CPU)


def _training(tmp_path, decode: str, out: str, *extra: str) -> list[str]:
    return ["castream_imagenet", "--model", "resnet18_castream", "--set", 'model_args={"backbone": "resnet10t"}',
            "--set", f"decode={decode}", "--weights", "none", "--data-root", str(tmp_path / "data"),
            "--image-size", "32", "--workers", "0", "--batch-size", "4", "--epochs", "2",
            "--output-dir", str(tmp_path / out), "--cpu", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "model.safetensors")


def test_training_on_the_device_path_ends_with_the_workers_weights_in_one_or_two_processes(tmp_path):
    write_photos(tmp_path / "data")
    for decode in ("workers", "device"):
        subprocess.run([sys.executable, "-m", "zoo.training.train", *_training(tmp_path, decode, decode)],
                       check=True, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    str(Path(__file__).parent / "launch_training.py"), str(tmp_path),
                    *_training(tmp_path, "device", "two")], check=True, cwd=tmp_path, capture_output=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(not set(seen[0][e]) & set(seen[1][e]) for e in ("0", "1"))
    workers, device, two = _weights(tmp_path / "workers"), _weights(tmp_path / "device"), _weights(tmp_path / "two")
    assert all(torch.equal(workers[k], device[k]) for k in workers), "on a CPU both paths decode the same pixels"
    assert all(torch.allclose(device[k], two[k], atol=1e-5) for k in device)


def test_the_recipe_loaders_decode_where_the_recipe_says(tmp_path):
    write_photos(tmp_path)
    for decode, kind in (("workers", torch.Tensor), ("auto", torch.Tensor), ("device", EncodedBatch)):
        recipe = load_recipe("castream_imagenet", model="resnet18_castream", weights=None, data_root=str(tmp_path),
                             decode=decode, workers=0, batch_size=2, output_dir=str(tmp_path / "run"))
        train_set, val_set, _ = build_datasets(recipe)
        train_loader, val_loader = build_loaders(recipe, train_set, val_set, CONFIG, 2, CPU)
        train_loader.dataset.set_epoch(0)
        for loader in (train_loader, val_loader):
            images, _ = next(iter(loader))
            assert isinstance(images, kind)
            assert images.to(CPU).shape == (2, 3, 64, 64)


def test_images_read_undecoded_keep_their_size_and_format(tmp_path):
    write_photos(tmp_path)
    folder = ImageFolderDataset(tmp_path, "train")
    folder.defer_decoding()
    for index, (path, _) in enumerate(folder.source.samples):
        encoded, target = folder.load(index)
        with Image.open(path) as image:
            assert (encoded.height, encoded.width) == (image.height, image.width) == target["boxes"].canvas_size
    folder.defer_decoding(False)
    assert isinstance(folder.load(0)[0], Image.Image)


def test_the_harness_scores_the_same_images_decoded_on_the_device(tmp_path):
    from zoo.evaluation.harness import main

    make_cub(tmp_path / "data", images=tuple(CubImage(1 + i % 3, False, (8 + 4 * i, 8, 40, 30 + 2 * i))
                                             for i in range(4)))
    results = {}
    for decode in ("workers", "device"):
        main(["resnet18_castream", "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--methods", "gradcam",
              "attention", "box", "--metrics", "faithfulness", "localisation", "--img-size", "64", "--batch-size", "2",
              "--cpu", "--decode", decode, "--out", str(tmp_path / decode)])
        (run_dir,) = (tmp_path / decode).iterdir()
        results[decode] = json.loads((run_dir / "results.json").read_text())
        for values in results[decode]["methods"].values():
            values.pop("seconds_per_image")
    assert results["workers"]["methods"] == results["device"]["methods"]
    assert results["device"]["methods"]["box"]["SP"] == 100, "the boxes followed the image"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_a_gpu_decodes_the_workers_samples_up_to_nvjpegs_rounding(tmp_path, decoder):
    root = write_photos(tmp_path)
    workers = ImageFolderDataset(root, "train", train_transform(CONFIG, "imagenet"))
    device = on_device(ImageFolderDataset(root, "train", train_transform(CONFIG, "imagenet")))
    samples = [drawn(device, index) for index in range(len(device))]
    on_gpu = collate(samples)[0].to("cuda").cpu()
    expected = torch.stack([drawn(workers, index)[0] for index in range(len(workers))])
    difference = (on_gpu - expected).abs() * torch.tensor(CONFIG["std"]).view(3, 1, 1) * 255  # in grey levels
    assert difference.mean() < 1.0 and difference.max() < 48, "nvJPEG and the GPU's resize round differently"
    for index, (_, target) in enumerate(samples):
        torch.testing.assert_close(target["boxes"], drawn(workers, index)[1]["boxes"], rtol=0, atol=0)
