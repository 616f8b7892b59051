"""TRL's supervised fine-tuning with GOAT's balance loss (an optional extra: pip install 'goat-lora[trl]').

    trainer = GoatSFTTrainer(model=goat_model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer)
    loss = TRL's loss + aux_loss_coef * goat_model.aux_loss()          (GoatSFTTrainer.compute_loss)

as GoatTrainer.compute_loss adds it for `goat train`. A frozen reference for DPO-style losses or a KL
penalty is the same model under `goat_model.disable_adapter()` (the pretrained model, no gradient, no
routing recorded), so no second copy of the model is needed; examples/trl_sft.py shows both.
"""

from __future__ import annotations

from trl import SFTTrainer

from .model import GoatModel


class GoatSFTTrainer(SFTTrainer):
    """trl.SFTTrainer for a GoatModel, whose loss includes GOAT's load-balancing loss.

    TRL patches the forward of the transformers model it trains (its fused LM head) and reads that
    model's backbone as `.base_model`, a transformers model's name for its backbone; on a GoatModel
    `.base_model` is the whole wrapped model. So TRL is given the wrapped transformers model (its
    GoatLayers and trainable parameters are the GoatModel's own) and the GoatModel stays here, as
    `goat_model`, for the balance loss. Checkpoints are therefore the wrapped model's: save the adapter
    with `trainer.goat_model.save_pretrained(DIR)`.
    """

    def __init__(self, model: GoatModel, *args, **kwargs) -> None:
        if not isinstance(model, GoatModel):
            raise ValueError(
                f"GoatSFTTrainer trains a GoatModel (goat_lora.get_goat_model, or GoatModel.from_pretrained(..., "
                f"is_trainable=True)), got {type(model).__name__}; for other models use trl.SFTTrainer"
            )
        self.goat_model = model
        super().__init__(model.base_model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.goat_model.padding_mask(inputs.get("attention_mask")):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        aux = self.goat_model.aux_loss()  # of the forward above, summed over the adapted layers
        # With num_items_in_batch, TRL's token loss is already a share of the accumulated batch's; the balance
        # loss is a per-batch mean, so it takes the same share (as TRL treats an MoE model's router loss).
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        loss = loss + self.goat_model.goat_config.aux_loss_coef * aux / steps
        metrics = getattr(self, "_metrics", None)  # TRL averages these into its logs
        if isinstance(metrics, dict):
            metrics["train" if self.model.training else "eval"]["goat_aux_loss"].append(float(aux.detach()))
        return (loss, outputs) if return_outputs else loss
