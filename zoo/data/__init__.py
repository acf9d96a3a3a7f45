"""Dataset readers for the evaluation harness and the training recipes, on the datasets' own on-disk formats.

Every reader is a torch ``Dataset`` with ``classes`` (names) and ``transforms``, and yields ``(image, target)``:

- ``image``: a PIL image (RGB; grayscale ``L`` for Fashion-MNIST), as torchvision's loaders give it;
- ``target["label"]``: the class index (int), or for VOC a float multi-hot tensor [20] over ``VOC_CLASSES``;
- ``target["boxes"]``: ``tv_tensors.BoundingBoxes`` [N, 4], format XYXY, ``canvas_size=(H, W)``; empty [0, 4]
  for datasets without boxes;
- ``target["box_labels"]``: int64 [N], the class of each box; VOC adds ``target["difficult"]``, bool [N].

``build_dataset(name, root, split)`` opens any of them: "imagenet-folder" (``ImageFolderDataset``), "cub"
(``CUB200``), "voc" (``VOC2012``), "cifar100" (``CIFAR100``), "fashion-mnist" (``FashionMNIST``, through
torchvision) and "fashion-mnist-idx" (``FashionMNISTIdx``, offline from ``FASHION_MNIST_DEBIAN_DIR``, where
``apt-get install dataset-fashion-mnist`` puts the files). VOC's ``label`` counts difficult objects unless
``difficult="drop"`` (see ``VOC2012``). ``find_fashion_mnist()`` says where Fashion-MNIST is (a given folder, the
Debian package's, installed with apt when possible, or torchvision's download) and in which layout.

``dataset_images(name, root, config, indices)`` gives some of a dataset's images preprocessed for a model's data
config, stacked, with their targets; ``box_share(dataset, indices)`` the mean share of the image its box covers
(the pointing game's chance level); ``sample_indices(count, size, seed)`` a fixed random sample of a split's
indices (the ``--limit`` of zoo-train and zoo-eval).

"fashion-canvas" (``FashionCanvas``) and "fashion-canvas-multi" (``FashionCanvasMulti``) turn Fashion-MNIST
into localisation data, generated on the fly: each item at a random place and scale on a black ``size`` x
``size`` RGB canvas (96 by default) among dimmed fragments of other items of the same split, with the exact box
of the item's non-zero pixels, as CUB's (``label`` an int, one box); or 2-3 items of distinct classes, apart, with
a multi-hot float ``label`` [10] and one box per item, as VOC's. Canvas ``i`` is drawn from a generator seeded by
``(seed, split, i)``: the same bytes in any process or order. Options (``build_dataset(..., size=64, seed=1)``):
``size``, ``objects``, ``count``, ``seed``, ``scale``, ``clutter``, and ``source`` ("idx", the default, reads the
Debian idx files in ``root``; "torchvision" torchvision's layout, which ``download=True`` fetches). See
``zoo/data/canvas.py``.

``transforms`` is a ``torchvision.transforms.v2`` transform called as ``transforms(image, target)``, so boxes
follow every resize, crop and flip of the image. ``sanitize_boxes()`` drops the boxes a crop emptied together
with their ``box_labels`` and ``difficult``; ``collate`` is the DataLoader's ``collate_fn``. The evaluation
preprocessing (``transforms.eval_transform``) clips boxes to its centre crop and drops none: a box wholly
outside the crop stays, with zero area.

Readers of image files (ImageNet folders, CUB, VOC) can leave decoding to the device that consumes the batches:
after ``defer_decoding()`` they yield the files undecoded, ``device.DeviceTransforms`` (the same v2 transforms,
the same random draws) takes the place of ``transforms``, and a batch's ``.to(device)`` decodes and transforms it
there (nvJPEG on a GPU); ``device.decoding_transforms`` chooses between the two paths.

An entry of a list file that names a file (CUB's images.txt, the image ids of VOC's ImageSets) must be a
relative path of plain names whose file lies inside the dataset (``base.listed_path``); any other entry is
refused when the reader is built, before any image is read, by a ValueError naming the file, line and entry.

Box coordinates are in pixels of the image as stored, continuous, with the origin at the top-left corner of
the top-left pixel: pixel (column i, row j), counted from 0, covers [i, i + 1) x [j, j + 1). A box
``[x1, y1, x2, y2]`` covers [x1, x2) x [y1, y2): x1, y1 is its top-left corner (its first pixel included),
x2, y2 its bottom-right corner (one past its last pixel), so its width is x2 - x1, as torchvision's transforms
and ``box_area`` take it. Conversions:

- VOC's ``xmin ymin xmax ymax`` are 1-based pixel indices, both ends included: ``[xmin - 1, ymin - 1, xmax, ymax]``;
- CUB's ``x y width height`` (floats) are the top-left corner in the convention above and the extent:
  ``[x, y, x + width, y + height]``.

A box of negative width or height, or reaching outside the image, is a ValueError naming the file and line (or
XML object) that gave it, raised when its sample is read, the first time the image's size is known.
"""

from .base import ImageDataset, box_share, collate, make_target, sample_indices, sanitize_boxes
from .canvas import FashionCanvas, FashionCanvasMulti
from .classification import (
    CIFAR100,
    FASHION_MNIST_DEBIAN_DIR,
    FashionMNIST,
    FashionMNISTFiles,
    FashionMNISTIdx,
    ImageFolderDataset,
    find_fashion_mnist,
    read_idx,
)
from .cub import CUB200
from .factory import DATASETS, build_dataset, dataset_images
from .voc import VOC2012, VOC_CLASSES

__all__ = [
    "CIFAR100",
    "CUB200",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "VOC2012",
    "VOC_CLASSES",
    "FashionCanvas",
    "FashionCanvasMulti",
    "FashionMNIST",
    "FashionMNISTFiles",
    "FashionMNISTIdx",
    "ImageDataset",
    "ImageFolderDataset",
    "box_share",
    "build_dataset",
    "dataset_images",
    "collate",
    "find_fashion_mnist",
    "make_target",
    "read_idx",
    "sample_indices",
    "sanitize_boxes",
]
