"""Readers of classification-only datasets (no boxes): class folders, CIFAR-100, Fashion-MNIST (and finding it)."""

import gzip
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torchvision.datasets as tvd
from PIL import Image

from .base import ImageDataset, Sample, make_target

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class SourceDataset(ImageDataset):
    """A reader over a torchvision dataset (``self.source``) that yields (PIL image, class index)."""

    source: tvd.VisionDataset

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> Sample:
        image, label = self.source[index]
        return image, make_target(image, label)


class ImageFolderDataset(SourceDataset):
    """ImageNet-style class folders; torchvision's ImageFolder lists them (classes: sorted folder names)."""

    splits = ("train", "val")
    layout = "<root>/{train,val}/<class folder>/<image>, one subfolder per class (e.g. ImageNet's wnids)"
    image_files = True

    def __init__(self, root, split: str, transforms=None):
        super().__init__(split, transforms)
        self.require(Path(root))
        self.source = tvd.ImageFolder(self.require(Path(root) / split), loader=self.read_image)


class TorchvisionDataset(SourceDataset):
    """A torchvision dataset with a ``train`` flag and ``download``; a missing copy is a FileNotFoundError."""

    downloadable = True
    source_class: type[tvd.VisionDataset]

    def __init__(self, root, split: str, transforms=None, download: bool = False):
        super().__init__(split, transforms)
        try:
            self.source = self.source_class(str(root), train=split == "train", download=download)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{type(self).__name__} not found or corrupted in {root}: expected {self.layout}; "
                "download=True fetches it"
            ) from error


class CIFAR100(TorchvisionDataset):
    """CIFAR-100 (100 fine classes) read by torchvision.

    The dataset's official format is Python pickle (the batches of ``cifar-100-python.tar.gz``); torchvision
    checks every file's md5 against the official archive's before unpickling it. No other pickle is read here.
    """

    source_class = tvd.CIFAR100
    layout = "<root>/cifar-100-python/{train,test,meta} (cifar-100-python.tar.gz extracted in root)"


class FashionMNIST(TorchvisionDataset):
    """Fashion-MNIST read by torchvision (grayscale 28x28 PIL images)."""

    source_class = tvd.FashionMNIST
    layout = "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST's format), gzipped when its name ends in ``.gz``."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: not a complete gzip file ({error})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic number {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != np.prod(shape):
        raise ValueError(f"{path}: {len(body)} bytes of data for the shape {shape} in its header")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


class FashionMNISTIdx(ImageDataset):
    """Fashion-MNIST read offline from a folder of idx files, such as the Debian package's.

    ``apt-get install dataset-fashion-mnist`` puts the four gzipped files in ``FASHION_MNIST_DEBIAN_DIR``.
    torchvision's own idx reader takes only uncompressed files, hence ``read_idx``.
    """

    layout = (
        f"<root>/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz], as the Debian package dataset-fashion-mnist "
        f"installs them in {FASHION_MNIST_DEBIAN_DIR} (apt-get install dataset-fashion-mnist)"
    )
    classes = tvd.FashionMNIST.classes

    def __init__(self, root, split: str, transforms=None):
        super().__init__(split, transforms)
        prefix = self.require(Path(root)) / ("train" if split == "train" else "t10k")
        self.images = read_idx(self.find_file(f"{prefix}-images-idx3-ubyte"))
        self.labels = read_idx(self.find_file(f"{prefix}-labels-idx1-ubyte"))
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"{prefix}-*: images of shape {self.images.shape} and labels of shape {self.labels.shape} "
                "do not pair up as [N, H, W] and [N]"
            )
        if self.labels.size and self.labels.max() >= len(self.classes):
            raise ValueError(f"{prefix}-labels-idx1-ubyte: label {self.labels.max()} beyond the 10 classes")

    def find_file(self, name: str) -> Path:
        """``name.gz`` or, failing it, ``name``."""
        for candidate in (Path(f"{name}.gz"), Path(name)):
            if candidate.exists():
                return candidate
        return self.require(Path(f"{name}.gz"))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Sample:
        image = Image.fromarray(self.images[index])
        return image, make_target(image, int(self.labels[index]))


class FashionMNISTFiles(NamedTuple):
    """Where Fashion-MNIST lies: ``root`` and its layout, ``source`` ("idx": the idx files themselves, as the
    Debian package has them; "torchvision": torchvision's layout), the canvases' ``source`` option."""

    root: str
    source: str

    @property
    def dataset(self) -> str:
        """The ``build_dataset`` name of the plain 28x28 images in this layout."""
        return "fashion-mnist-idx" if self.source == "idx" else "fashion-mnist"


def find_fashion_mnist(folder: Path | None = None, download_root: Path = Path("data"),
                       install: bool = False) -> FashionMNISTFiles:
    """Fashion-MNIST offline if possible: ``folder`` of idx files if given, else the Debian package's files in
    ``FASHION_MNIST_DEBIAN_DIR`` (with ``install``, ``apt-get install dataset-fashion-mnist`` is run first when
    they are missing and apt is at hand, as root or through password-less sudo), else torchvision's copy,
    downloaded into ``download_root`` once."""
    if folder is not None:
        return FashionMNISTFiles(str(folder), "idx")
    marker = FASHION_MNIST_DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz"
    if install and not marker.exists() and shutil.which("apt-get"):
        command = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            command = ["sudo", "-n", *command]
        print(f"Fashion-MNIST is missing: {' '.join(command)}")
        subprocess.run(command, check=False)
    if marker.exists():
        return FashionMNISTFiles(str(FASHION_MNIST_DEBIAN_DIR), "idx")
    print(f"Fashion-MNIST through torchvision (downloaded into {download_root}/ once)")
    for split in ("train", "test"):
        FashionMNIST(download_root, split, download=True)
    return FashionMNISTFiles(str(download_root), "torchvision")
