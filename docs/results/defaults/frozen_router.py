# diagnosis only: GOAT at the rule's default rate with the routers frozen (not a project feature)
import sys
import goat_lora.engine.run as run_mod
from goat_lora.layer import GoatLayer
from goat_lora.settings import RunSettings

original = run_mod.build_model
def build_model(run, meta, train_split=None):
    parts, model = original(run, meta, train_split)
    for m in model.modules():
        if isinstance(m, GoatLayer):
            m.router.weight.requires_grad_(False)
    return parts, model
run_mod.build_model = build_model
m = run_mod.train(RunSettings(data="trump-tweets", seed=0, report_to="none"), sys.argv[1], writing=run_mod.Writing(overwrite=True, quiet=True))
print("test", m["test_accuracy"], m["lr"], [round(e["validation_accuracy"],3) for e in m["per_epoch_eval"]])
