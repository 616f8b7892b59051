"""TRL's SFTTrainer with a GOAT adapter (GOAT's balance loss added), then a DPO-style reference forward.

    python examples/trl_sft.py [--model smollm2|PATH] [--steps 10] [--output runs/trl-sft]

Needs `pip install 'goat-lora[trl]'`. Fine-tunes the shipped SmolLM2-135M (or --model) on the shipped
instruction set with GoatSFTTrainer (TRL's loss + aux_loss_coef * model.aux_loss()), saves the adapter
to OUTPUT/adapter, and prints the mean per-token KL(policy || reference) on a few prompts, where the
reference is the pretrained model reached through `model.disable_adapter()`: what a DPO loss or a KL
penalty needs, without a second copy of the model.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from trl import SFTConfig

from goat_lora import GoatConfig, get_goat_model
from goat_lora.hf import load_causal_lm, load_tokenizer
from goat_lora.tasks.causal_lm import instructions_path
from goat_lora.trl import GoatSFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a causal LM: smollm2 (shipped), a local path or hub name")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps (default 10)")
    parser.add_argument(
        "--output", default="runs/trl-sft", help="TRL's output folder; the adapter goes to OUTPUT/adapter"
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the shipped model and data need no hub
    tokenizer = load_tokenizer(args.model)
    model = get_goat_model(load_causal_lm(args.model, dtype=torch.float32), GoatConfig(r=8, num_experts=8, top_k=2))
    with open(instructions_path(), encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,  # TRL's default is bfloat16 autocast, also on a CPU; float32 keeps the reference exact
    )
    trainer = GoatSFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    model.save_pretrained(os.path.join(args.output, "adapter"))

    # A DPO-style reference: the same model with the adapter switched off (no gradient, no routing recorded).
    model.eval()
    batch = tokenizer([text[: len(text) // 2] for text in texts[:8]], return_tensors="pt", padding=True)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    with torch.no_grad():
        policy = torch.log_softmax(model(**batch).logits.float(), -1)
    with model.disable_adapter():
        reference = torch.log_softmax(model(**batch).logits.float(), -1)
    kl = (policy.exp() * (policy - reference)).sum(-1)[batch["attention_mask"].bool()].mean()
    print(f"adapter: {os.path.join(args.output, 'adapter')}")
    print(f"mean per-token KL(policy || pretrained reference) on 8 prompts: {float(kl):.4f}")


if __name__ == "__main__":
    main()
