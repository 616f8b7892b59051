"""`--task image-classification`: an image -> one of C classes.

    --data DIR                       an image folder DIR/<class>/<image file> (files may sit in sub-folders);
                                     --test-data another folder with the same classes, else a seeded 20% split
    --data FILE --image-column I --label-column L
                                     a .csv / .parquet / .jsonl table of image paths (relative to the table's
                                     folder) and labels; --test-data another table or folder
    --data NAME [--data-config C]    a datasets hub image data set (needs network); its Image column is decoded
    --model M                        any transformers image classifier saved with its image processor (ViT,
                                     CLIP's vision tower through CLIPForImageClassification, ConvNeXt, ...);
                                     default the shipped EfficientNet-Lite0
    metrics: accuracy, macro_f1, matthews_corrcoef, loss (scored exactly as --task classification)

Class names are the folder names (or the label column's values), sorted as classification sorts them
(numerically when every name is an integer). A test folder or table with a class the training data
lacks is refused with one line.

Models. EfficientNet-Lite0 (the default): images resized to --image-size, ImageNet mean / std, grey
repeated to 3 channels; its 1x1 convolutions are adapted, as in goat-lora 0.1.0. A transformers model:
its own AutoImageProcessor prepares RGB images (--image-size does not apply), its `classifier` is a
fresh head trained in full, and every other Linear layer is adapted. --target-modules overrides both.
BatchNorm layers (EfficientNet's, a ResNet's) keep their pretrained running statistics: they stay in
eval mode while training, so the adapter and head are all a run changes and `goat eval` reproduces
the run's metrics exactly (running statistics are not part of an adapter).

Images are read lazily: a split holds file paths (hub data sets: the encoded bytes; Fashion-MNIST:
arrays) and the collator decodes each batch. When the data is loaded, every image of the three kept
splits (after --train-size / --test-size) is checked without a full decode, so that a missing,
unreadable or corrupt file stops the run before training with one line naming it: PIL's `verify()`
(a PNG's structure and checksums; cheap), and for a JPEG, where verify() checks nothing, a decode at
1/8 scale (draft mode: about half the time of a full decode for a photo, well under 1 ms for small
images) that finds a truncated file. A file that still fails to decode later is named the same way.

Built in (offline; docs/assets.md): `fashion-mnist`, Debian's dataset-fashion-mnist (60k / 10k
28x28 grey images, 10 clothing classes); by default 3000 training and 1000 test images, 2 epochs.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
from dataclasses import dataclass

import torch

from .. import hf
from .base import ModelParts, Split, TaskData
from .classification import Classification
from .tables import (
    check_class_values,
    check_two_classes,
    is_table_path,
    label_ids,
    load_hub,
    read_table,
    require_columns,
    train_validation_test,
)
from .text import first_line, load_model, target_layers

# What the image-folder reader takes for an image file; other files (notes, .DS_Store) are skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- built-in data: Fashion-MNIST ------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def _read_idx(path: str):
    """An idx file (MNIST's format: magic, dims, uint8 data) as a numpy array."""
    import numpy as np

    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_file(stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(FASHION_MNIST_DIR, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}/{stem}.gz missing); run: "
        "apt-get update && apt-get install -y dataset-fashion-mnist (scripts/install.sh does it)"
    )


def fashion_mnist() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): 60000 / 10000 uint8 28x28 arrays."""
    images = {s: _read_idx(_fashion_mnist_file(f"{s}-images-idx3-ubyte")) for s in ("train", "t10k")}
    labels = {s: _read_idx(_fashion_mnist_file(f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")}
    return (
        Split(list(images["train"]), [int(v) for v in labels["train"]]),
        Split(list(images["t10k"]), [int(v) for v in labels["t10k"]]),
        list(FASHION_MNIST_LABELS),
        {"source": FASHION_MNIST_DIR},
    )


BUILTINS = {name: fashion_mnist for name in ("fashion-mnist", "fashion_mnist", "fashionmnist")}  # 0.1.0 took all three


# ---- where an image comes from: a file path, encoded bytes, an array ----------------------------------
@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (a hub data set's Image column), with a name for errors."""

    data: bytes
    name: str  # for errors: "<hub name>:<split> row <n>"


def image_name(source) -> str:
    return source.name if isinstance(source, EncodedImage) else str(source)


@contextlib.contextmanager
def _reading(source):
    """The PIL image of a path or EncodedImage, opened; a missing file, or any failure to read it
    inside the block, becomes one line naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source.data) if isinstance(source, EncodedImage) else source) as image:
            yield image
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {image_name(source)!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"image {image_name(source)!r} is corrupt or not an image: {first_line(err)}") from None


def open_image(source):
    """A decoded PIL image from a path or EncodedImage (arrays and PIL images pass through)."""
    import numpy as np
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    with _reading(source) as image:
        image.load()
    return image


def verify_images(split: Split) -> None:
    """Every file of `split` checked without a full decode: PIL's verify() (a PNG's chunks and their
    checksums, ...); a JPEG, where verify() checks nothing, is decoded at 1/8 scale (draft mode), which
    still reads all of its data and so finds a truncated file."""
    for source in split.inputs:
        if not isinstance(source, (str, EncodedImage)):
            continue  # arrays (Fashion-MNIST) are already pixels
        with _reading(source) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
                image.load()
            else:
                image.verify()


# ---- labelled images: a folder, a table, a hub data set -----------------------------------------------
def image_files(folder: str) -> list[str]:
    """The image files under `folder` (sub-folders too), in a fixed (sorted) order; hidden ones skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def read_image_folder(folder: str) -> tuple[list, list]:
    """(image paths, class names) of FOLDER/<class>/<image file>."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {folder!r} has no class folders; expected {folder}/<class>/<image file>")
    inputs, raw = [], []
    for name in classes:
        files = image_files(os.path.join(folder, name))
        if not files:
            raise ValueError(
                f"image folder {folder!r}: class folder {name!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
            )
        inputs += files
        raw += [name] * len(files)
    return inputs, raw


def frame_images(frame, settings, source: str, base_dir: str | None, info: dict | None = None) -> tuple[list, list]:
    """(image sources, raw labels) of a table or a hub split. A path is relative to `base_dir` (the
    table's folder); a datasets Image value ({"bytes", "path"}) becomes its bytes (or its path)."""
    kept = require_columns(
        frame, {"--image-column": settings.image_column, "--label-column": settings.label_column}, source, info
    )
    inputs = []
    for row, value in zip(kept.index, kept[settings.image_column]):
        if isinstance(value, dict) and value.get("bytes") is not None:
            inputs.append(EncodedImage(bytes(value["bytes"]), f"{source} row {row}"))
            continue
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path.strip():
            raise ValueError(
                f"data {source!r}: image column {settings.image_column!r} holds {value!r} at row {row}; "
                "expected an image file path"
            )
        inputs.append(os.path.join(base_dir, path) if base_dir is not None else path)
    raw = kept[settings.label_column].tolist()
    check_class_values(raw, settings.label_column, source)
    return inputs, raw


def read_labelled_images(source: str, settings) -> tuple[list, list, dict]:
    """(image sources, raw labels, info) of an image folder or a table file."""
    info = {"source": os.path.abspath(source)}
    if os.path.isdir(source):
        return (*read_image_folder(source), info)
    base_dir = os.path.dirname(os.path.abspath(source))
    info.update(image_column=settings.image_column, label_column=settings.label_column)
    inputs, raw = frame_images(read_table(source), settings, source, base_dir, info)
    return inputs, raw, info


def class_ids(raw: list, label_names: list[str], source: str) -> list[int]:
    """Labels of test or evaluation data -> the training classes' ids; a class they lack is one line."""
    try:
        return label_ids(raw, label_names)[0]
    except ValueError as err:
        raise ValueError(f"data {source!r}: {err}") from None


# ---- images -> pixels ------------------------------------------------------------------------------
class ImageCollator:
    """A batch of images -> {"pixel_values": (B, 3, H, W) float32, "labels": (B,) long}.

    With a transformers image processor: the processor's own resizing and normalisation of RGB images.
    Without one (EfficientNet-Lite0): a bilinear resize to image_size x image_size, ImageNet mean / std,
    a grey image repeated over 3 channels."""

    def __init__(self, processor=None, image_size: int = 64) -> None:
        self.processor, self.image_size = processor, image_size

    def __call__(self, batch: list[dict]) -> dict:
        if self.processor is not None:
            images = [open_image(item["input"]).convert("RGB") for item in batch]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([self.imagenet_pixels(item["input"]) for item in batch])
        return {
            "pixel_values": pixels.float().contiguous(),
            "labels": torch.tensor([item["labels"] for item in batch], dtype=torch.long),
        }

    def imagenet_pixels(self, source) -> torch.Tensor:
        import numpy as np

        if isinstance(source, np.ndarray):
            array = source
        else:
            image = open_image(source)
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            array = np.asarray(image.convert("L" if grey else "RGB"))
        pixels = torch.from_numpy(np.array(array, dtype=np.float32)) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)  # (C, H, W), C = 1 or 3
        # antialias: a large photo shrunk to --image-size keeps its detail (no effect when enlarging)
        pixels = torch.nn.functional.interpolate(
            pixels[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        pixels = pixels.expand(3, -1, -1)
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (pixels - mean) / std  # (3, image_size, image_size)


# ---- the model -------------------------------------------------------------------------------------
def freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Every BatchNorm layer stays in eval mode, also when the model trains: it normalises with the
    pretrained running statistics and never updates them (they are not saved with an adapter)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = functools.partial(_stay_in_eval, module)  # what model.train() calls on each child


def _stay_in_eval(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(module, False)


# ---- the family ------------------------------------------------------------------------------------
class ImageClassification:
    name = "image-classification"
    metrics = Classification.metrics
    lower_is_better = Classification.lower_is_better
    baseline_name = Classification.baseline_name
    builtin_data = tuple(BUILTINS)
    # Scored exactly as text classification: the same predictions -> metrics, the same majority class.
    evaluate = Classification.evaluate
    constant_baseline = Classification.constant_baseline

    def defaults(self, settings) -> dict:
        data = settings.data or "fashion-mnist"
        builtin = data in BUILTINS
        return {
            "data": data,
            "model": hf.EFFICIENTNET_LITE0,
            "image_column": "image",
            "label_column": "label",
            "epochs": 2,
            "batch_size": 32,
            "train_size": 3000 if builtin else None,
            "test_size": 1000 if builtin else None,
        }

    def load_data(self, settings) -> TaskData:
        source = settings.data
        if source in BUILTINS:
            train, test, names, info = BUILTINS[source]()
        else:
            train, test, names, info = self._user_data(settings)
        check_two_classes(train, names, source)
        whole = train
        train, validation, test = train_validation_test(train, test, settings, info)
        check_two_classes(train, names, source, before_split=whole)
        for split in (train, validation, test):
            verify_images(split)
        return TaskData(source, {"label_names": names}, train, validation, test, info)

    @staticmethod
    def _user_data(settings) -> tuple[Split, Split | None, list[str], dict]:
        """An image folder, a table or a hub data set, plus --test-data (a folder or a table)."""
        source, hub_test = settings.data, None
        if os.path.isdir(source) or is_table_path(source):
            inputs, raw, info = read_labelled_images(source, settings)
        else:
            tables = load_hub(settings, settings.label_column)
            info = {**tables.info, "image_column": settings.image_column, "label_column": settings.label_column}
            inputs, raw = frame_images(tables.train, settings, f"{source}:{settings.train_split}", None, info)
            if tables.test is not None:
                hub_test = (f"{source}:{info['test_split']}", tables.test)
        labels, names = label_ids(raw)
        if os.path.isdir(source) and len(names) < 2:
            raise ValueError(f"image folder {source!r} has a single class folder ({names[0]!r}); need at least 2")
        test = None
        if settings.test_data is not None:
            test_inputs, test_raw, test_info = read_labelled_images(settings.test_data, settings)
            test = Split(test_inputs, class_ids(test_raw, names, settings.test_data))
            info["test_source"] = test_info["source"]
            info.setdefault("dropped_rows", []).extend(test_info.get("dropped_rows", []))
        elif hub_test is not None:
            test_inputs, test_raw = frame_images(hub_test[1], settings, hub_test[0], None, info)
            test = Split(test_inputs, class_ids(test_raw, names, hub_test[0]))
        return Split(inputs, labels), test, names, info

    def build(self, settings, meta: dict) -> ModelParts:
        names = meta["label_names"]
        if hf.is_efficientnet_lite0(settings.model):
            model = load_model(settings, hf.load_image_classifier, len(names))
            head = ["classifier"]
            targets = hf.image_target_modules(model)  # its 1x1 convolutions, unless --target-modules says otherwise
            if settings.target_modules:
                targets = target_layers(model, settings, head)
            collator = ImageCollator(image_size=settings.image_size)
        else:
            model = load_model(settings, hf.load_image_classifier, len(names), names, dtype=torch.float32)
            head = hf.default_modules_to_save(model)
            if not head:
                raise ValueError(
                    f"model {settings.model!r} ({type(model).__name__}) has no `classifier` head; "
                    "give a transformers image classifier"
                )
            targets = target_layers(model, settings, head)
            collator = ImageCollator(processor=load_model(settings, hf.load_image_processor))
        freeze_batch_norm_statistics(model)
        return ModelParts(model, collator, targets, head, meta)

    def load_eval_split(self, settings, source: str, meta: dict) -> Split:
        names = meta["label_names"]
        if source in BUILTINS:
            _, test, builtin_names, _ = BUILTINS[source]()
            if builtin_names != list(names):
                raise ValueError(
                    f"data {source!r} has labels {builtin_names[:10]}, but the run was trained on {names[:10]}"
                )
            return test
        if os.path.isdir(source) or is_table_path(source):
            inputs, raw, _ = read_labelled_images(source, settings)
        else:  # a hub data set: its test split (load_hub's choice), else its training split
            tables = load_hub(settings, settings.label_column)
            if tables.test is not None:
                frame, source = tables.test, f"{source}:{tables.info['test_split']}"
            else:
                frame, source = tables.train, f"{source}:{settings.train_split}"
            inputs, raw = frame_images(frame, settings, source, None)
        split = Split(inputs, class_ids(raw, names, source))
        verify_images(split)
        return split
