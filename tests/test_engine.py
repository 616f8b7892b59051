"""engine/: training arguments that mean the same on transformers 4.x and 5.x."""

from __future__ import annotations

import pytest

from goat_lora.engine.trainer import training_arguments, warmup_arguments
from goat_lora.settings import RunSettings


def test_warmup_ratio_is_a_ratio_on_transformers_4_and_5():
    """Defect (a): transformers 4.x reads warmup_steps as a count (0.06 steps: no warm-up at all) and has
    warmup_ratio; transformers 5 dropped warmup_ratio and reads warmup_steps < 1 as a ratio."""
    four = {"warmup_ratio": None, "warmup_steps": None}  # the fields TrainingArguments 4.x declares
    five = {"warmup_steps": None}
    assert warmup_arguments(0.06, four) == {"warmup_ratio": 0.06}
    assert warmup_arguments(0.06, five) == {"warmup_steps": 0.06}


def test_the_installed_trainer_warms_up_over_the_ratio(tmp_path):
    args = training_arguments(RunSettings(batch_size=8, epochs=1, lr=1e-3, warmup_ratio=0.1, report_to="none"),
                              str(tmp_path), quiet=True)  # fmt: skip
    assert args.get_warmup_steps(200) == 20
    zero = training_arguments(RunSettings(batch_size=8, epochs=1, lr=1e-3, warmup_ratio=0.0, report_to="none"),
                              str(tmp_path), quiet=True)  # fmt: skip
    assert zero.get_warmup_steps(200) == 0


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_schedule_knobs_reach_the_trainer(tmp_path, scheduler):
    settings = RunSettings(batch_size=8, epochs=1, lr=1e-3, lr_scheduler=scheduler, gradient_accumulation_steps=4,
                           max_grad_norm=0.5, weight_decay=0.01, eval_batch_size=7, report_to="none")  # fmt: skip
    args = training_arguments(settings, str(tmp_path), quiet=True)
    assert args.lr_scheduler_type.value == scheduler and args.gradient_accumulation_steps == 4
    assert (args.max_grad_norm, args.weight_decay, args.per_device_eval_batch_size) == (0.5, 0.01, 7)
