"""CUB-200-2011 in its official layout: 200 bird species, one box per image."""

from pathlib import Path
from typing import NamedTuple

from .base import ImageDataset, Line, Sample, check_boxes, image_size, listed_path, make_target, parse, read_table


class CubImage(NamedTuple):
    """One image of the split, with where its image and box were listed."""

    path: Path
    listed_at: str
    label: int
    box: tuple[float, float, float, float]
    box_source: str


class CUB200(ImageDataset):
    """CUB-200-2011, split ``train`` or ``test`` by train_test_split.txt (1 = train).

    Classes are the names of classes.txt (``001.Black_footed_Albatross``, ...), indexed in the order of their
    1-based ids. The box of bounding_boxes.txt, ``x y width height``, becomes ``[x, y, x + width, y + height]``.
    Every entry of images.txt must be ``<class folder>/<image>`` inside ``images`` (see ``listed_path``).
    """

    image_files = True
    layout = (
        "<root>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, "
        "classes.txt, images/<class folder>/<image>.jpg} (CUB_200_2011.tgz extracted in root)"
    )

    def __init__(self, root, split: str, transforms=None):
        super().__init__(split, transforms)
        self.require(Path(root))
        folder = self.require(Path(root) / "CUB_200_2011")
        classes = self.read_by_id(folder / "classes.txt", 1)
        self.classes = [classes[class_id].fields[0] for class_id in sorted(classes)]
        class_index = {class_id: index for index, class_id in enumerate(sorted(classes))}
        images = self.read_by_id(folder / "images.txt", 1)
        labels = self.read_by_id(folder / "image_class_labels.txt", 1, images)
        is_train = self.read_by_id(folder / "train_test_split.txt", 1, images)
        boxes = self.read_by_id(folder / "bounding_boxes.txt", 4, images)
        self.images = []
        for image_id in sorted(images):
            listed_at, (entry,) = images[image_id]
            path = listed_path(folder / "images", entry, listed_at, "<class folder>/<image>")
            flag = parse(is_train[image_id].source, is_train[image_id].fields[0], int)
            if flag not in (0, 1):
                raise ValueError(f"{is_train[image_id].source}: the split flag must be 1 (train) or 0 (test)")
            if (flag == 1) != (split == "train"):
                continue
            class_id = parse(labels[image_id].source, labels[image_id].fields[0], int)
            if class_id not in class_index:
                raise ValueError(f"{labels[image_id].source}: class id {class_id} is not in classes.txt")
            x, y, width, height = (parse(boxes[image_id].source, text, float) for text in boxes[image_id].fields)
            self.images.append(
                CubImage(
                    path=path,
                    listed_at=listed_at,
                    label=class_index[class_id],
                    box=(x, y, x + width, y + height),
                    box_source=boxes[image_id].source,
                )
            )

    def read_by_id(self, path: Path, columns: int, known_ids: dict[int, Line] | None = None) -> dict[int, Line]:
        """The lines of a table keyed by their first field, an id; with ``known_ids``, exactly those ids."""
        lines = {}
        for line in read_table(self.require(path), 1 + columns):
            key = parse(line.source, line.fields[0], int)
            if key in lines:
                raise ValueError(f"{line.source}: id {key} already given at {lines[key].source}")
            if known_ids is not None and key not in known_ids:
                raise ValueError(f"{line.source}: unknown image id {key} (not in images.txt)")
            lines[key] = Line(line.source, line.fields[1:])
        missing = set(known_ids or ()) - set(lines)
        if missing:
            raise ValueError(f"{path}: no line for the image ids {sorted(missing)[:10]} of images.txt")
        return lines

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Sample:
        record = self.images[index]
        image = self.read_image(self.require(record.path, record.listed_at))
        check_boxes([record.box], image_size(image), [record.box_source])
        return image, make_target(image, record.label, [record.box], [record.label])
