"""Tiny seeded models, built from configs (no download), for the test suite and `goat bench --smoke`.

One home for them, so that a seed and a size name one model everywhere. The `tiny_*` builders seed
Python's and torch's generators (`seed_everything`) before drawing the weights and return the model in
eval mode; `tiny_vit`, `minilm_vocab_bert` and the `save_*` writers seed torch's generator only. The
config builders take any transformers config field as a keyword, which replaces the default.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- transformers configs: 2 layers, `hidden` wide, feed-forward 2 x hidden ---------------------------


def llama_config(hidden: int = 32, **fields):
    """A LlamaConfig: vocabulary 64, 4 heads (2 key-value heads), 64 positions, pad / bos / eos 0 / 1 / 2."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            "vocab_size": 64,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **fields,
        }
    )


def bert_config(hidden: int = 32, **fields):
    """A BertConfig: vocabulary 64, 4 heads, 64 positions, 2 labels."""
    from transformers import BertConfig

    return BertConfig(
        **{
            "vocab_size": 64,
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 2 * hidden,
            "max_position_embeddings": 64,
            "num_labels": 2,
            **fields,
        }
    )


def gpt2_config(**fields):
    """A GPT2Config: vocabulary 64, 64 positions, width 32, 4 heads, pad 0."""
    from transformers import GPT2Config

    return GPT2Config(
        **{"vocab_size": 64, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "pad_token_id": 0, **fields}
    )


# ---- models --------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32, **fields):
    """LlamaForCausalLM on llama_config(hidden, **fields)."""
    from transformers import LlamaForCausalLM

    config = llama_config(hidden, **fields)
    seed_everything(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_llama_classifier(seed: int = 0, hidden: int = 32, **fields):
    """LlamaForSequenceClassification on llama_config(hidden, **fields) (2 labels unless fields say)."""
    from transformers import LlamaForSequenceClassification

    config = llama_config(hidden, **{"num_labels": 2, **fields})
    seed_everything(seed)
    return LlamaForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, **fields):
    """GPT2LMHeadModel (Conv1D projections) on gpt2_config(**fields)."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(**fields)
    seed_everything(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_gpt2_classifier(seed: int = 0, **fields):
    """GPT2ForSequenceClassification (head `score`) on gpt2_config, 3 labels unless fields say."""
    from transformers import GPT2ForSequenceClassification

    config = gpt2_config(**{"num_labels": 3, **fields})
    seed_everything(seed)
    return GPT2ForSequenceClassification(config).eval()


def tiny_bert(seed: int = 0, hidden: int = 32, **fields):
    """BertForSequenceClassification (head `classifier`) on bert_config(hidden), 3 labels unless fields say."""
    from transformers import BertForSequenceClassification

    config = bert_config(hidden, **{"num_labels": 3, **fields})
    seed_everything(seed)
    return BertForSequenceClassification(config).eval()


def tiny_vit(seed: int = 0, layers: int = 2, heads: int = 2, num_labels: int = 2):
    """ViTForImageClassification on 16 x 16 images in 8 x 8 patches, width 32 (train mode)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def minilm_vocab_bert(seed: int = 0):
    """(model, tokenizer): a 2-layer BERT classifier (hidden 32, 2 labels, train mode) over the shipped
    MiniLM tokenizer's vocabulary, and that tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from .hf import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = bert_config(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tokenizer


class TinyConvNet(nn.Module):
    """1x1 convolutions (adaptable), one 3x3 convolution (not adaptable) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(8, 16, kernel_size=1)
        self.dw = nn.Conv2d(16, 16, kernel_size=3, padding=1)
        self.pw2 = nn.Conv2d(16, 16, kernel_size=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.pw1(x))
        x = torch.relu(self.dw(x))
        x = self.pw2(x)
        return self.head(x.mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    seed_everything(seed)
    return TinyConvNet().eval()


class TinyMLP(nn.Module):
    def __init__(self, sizes=(24, 32, 16)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_mlp(seed: int = 0, sizes=(24, 32, 16)) -> TinyMLP:
    seed_everything(seed)
    return TinyMLP(sizes).eval()


def token_batch(batch: int = 2, length: int = 7, vocab: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids in [3, vocab) from their own generator; the second row ends in 2 padding positions."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, -2:] = 0  # some padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---- model folders, as from_pretrained reads them -----------------------------------------------------


def save_tiny_decoder(folder, texts: list[str] | None = None, vocab_size: int = 300) -> str:
    """Write a tiny random LlamaForCausalLM (2 layers, hidden 32, 256 positions) and a byte-level BPE
    tokenizer of `vocab_size` tokens trained on `texts` (default: the shipped instruction set) to
    `folder`; returns the folder."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from .tasks.causal_lm import instructions_path

    if texts is None:
        with open(instructions_path(), encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(folder))
    config = llama_config(vocab_size=len(tokenizer), max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return str(folder)


def save_word_bert(folder, words: list[str], hidden: int = 32) -> str:
    """Write a tiny random BertForSequenceClassification (2 layers, 2 labels, no dropout) with a word-level
    tokenizer over `words` to `folder`; returns the folder."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = bert_config(
        hidden,
        vocab_size=len(words) + 5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return str(folder)
