"""GOAT adapters through peft's own API: after `register_with_peft()`,

    peft.PeftModel.from_pretrained(base, "adapter/")    the adapted model (the logits of GoatModel.from_pretrained)
    peft.PeftConfig.from_pretrained("adapter/")         a GoatPeftConfig (its GOAT fields as a GoatConfig)

so tools that load adapters through peft (lm-evaluation-harness's `peft=`, scripts written for LoRA)
load GOAT adapters unchanged.

peft has no public way to add an adapter type from outside its tree: `register_peft_method` refuses any
name that is not in its closed `PeftType` enum. What is left is the mapping dictionaries that its
loading code reads; `PeftType` is a str enum, so a plain "GOAT" key is found by `peft_type in mapping`
and `mapping[peft_type]`. Where those dictionaries live has moved between releases:

    the config class   peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING                         every release
    the tuner class    peft.peft_model.PEFT_TYPE_TO_MODEL_MAPPING                       0.13, 0.14
                       peft.peft_model.PEFT_TYPE_TO_TUNER_MAPPING                       0.15 and later
    the weights        set_peft_model_state_dict passes on the keys of a type that has
                       an entry in PEFT_TYPE_TO_PREFIX_MAPPING (peft.utils.save_and_load)  0.14 to 0.20
                       or asks the tuner class (_remap_adapter_state_dict_for_load)     0.21
                       and refuses every type it does not list                          0.13

`register_with_peft` finds all of them before it writes any; if one is missing it raises one error
naming the installed peft, so a peft that moved them again fails loudly instead of half-registered.
Tested with peft 0.14.0 and 0.21.2; peft 0.13.2 is refused with that error.

What peft keeps as `PeftModel.base_model` for a GOAT adapter is a `GoatPeftTuner`: a GoatModel built
by GoatModel.from_pretrained's own code from the adapter folder, with all its checks (weights
checksum, base-weight fingerprints). peft then reads the weights file once more and offers its tensors
to the model; the tuner takes none of them, since every tensor is already in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import peft
from peft import PeftConfig

from .checkpoint import PEFT_TYPE, read_adapter
from .config import GoatConfig
from .model import DEFAULT_ADAPTER, GoatModel, adapt_in_place

_PREFIX = "goat_"  # no GOAT tensor key contains it, so peft's key renaming (0.14-0.20) leaves every key as it is
TESTED_PEFT = "0.14.0 and 0.21.2"


@dataclasses.dataclass(init=False)
class GoatPeftConfig(PeftConfig):
    """adapter_config.json of a GOAT adapter as peft reads it. peft's own fields (peft_type "GOAT",
    base_model_name_or_path, inference_mode, ...) are attributes; GOAT's are checked by GoatConfig and
    kept together in `goat` (`goat_config` gives the GoatConfig), so that peft, which treats a
    `modules_to_save` attribute as its own business (wrapping those modules), sees none."""

    goat: dict = dataclasses.field(default_factory=dict)

    def __init__(self, **values) -> None:
        own = {f.name: f for f in dataclasses.fields(PeftConfig)}
        for name, spec in own.items():
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
            setattr(self, name, values.get(name, default))
        goat = {k: v for k, v in values.items() if k not in own}
        self.goat = GoatConfig.from_dict({**goat, "base_model_name_or_path": self.base_model_name_or_path}).to_dict()
        self.peft_type = PEFT_TYPE
        self.adapter_folder: str | None = None  # set by from_pretrained: where the tuner loads the adapter from
        self.__post_init__()

    @property
    def goat_config(self) -> GoatConfig:
        return GoatConfig.from_dict(self.goat)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config.adapter_folder = str(folder) if os.path.isdir(folder) else None
        return config


class GoatPeftTuner(GoatModel):
    """What peft's PeftModel keeps as `.base_model` for a GOAT adapter: a GoatModel loaded from the
    adapter folder (as GoatModel.from_pretrained loads it), with the attributes peft reads."""

    def __init__(self, model, peft_config: dict, adapter_name: str = DEFAULT_ADAPTER, **_peft_options) -> None:
        config = peft_config[adapter_name]
        folder = getattr(config, "adapter_folder", None)
        if folder is None:
            raise ValueError(
                "a GOAT adapter enters peft only through PeftModel.from_pretrained(base, LOCAL_ADAPTER_FOLDER) "
                "(a hub adapter: download it first); new GOAT adapters are made with goat_lora.get_goat_model"
            )
        saved = read_adapter(model, folder)
        super().__init__(model, *adapt_in_place(model, saved.config, saved))
        self.active_adapter = adapter_name
        self.peft_config = peft_config
        if config.inference_mode:  # PeftModel.from_pretrained(..., is_trainable=False), the default
            self._freeze()

    @property
    def model(self):
        """peft's name for the wrapped transformers model (PeftModel.get_base_model() returns it)."""
        return self.base_model

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict) -> dict:
        return {}  # peft 0.21 asks which of the file's tensors to load: none, the tuner loaded them all

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel's forward calls the wrapped model directly; this is where the balance loss learns the padding
        with self.padding_mask(kwargs.get("attention_mask")):
            yield


def _lookup(module: str, name: str) -> dict | None:
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def _first(*found: dict | None) -> dict | None:
    return next((mapping for mapping in found if mapping is not None), None)


def register_with_peft() -> None:
    """Teach the installed peft to load GOAT adapters (PeftModel.from_pretrained, PeftConfig.from_pretrained,
    and so lm-evaluation-harness's `peft=`). Idempotent. Raises RuntimeError naming the peft version when
    the mappings it needs are not where it looks, before writing any of them."""
    from peft.tuners.tuners_utils import BaseTuner

    config_mapping = _lookup("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING")
    tuner_mapping = _first(
        _lookup("peft.peft_model", "PEFT_TYPE_TO_TUNER_MAPPING"),
        _lookup("peft.peft_model", "PEFT_TYPE_TO_MODEL_MAPPING"),
    )
    prefix_mappings = [
        m
        for m in (
            _lookup("peft.mapping", "PEFT_TYPE_TO_PREFIX_MAPPING"),
            _lookup("peft.utils.constants", "PEFT_TYPE_TO_PREFIX_MAPPING"),
            _lookup("peft.utils.save_and_load", "PEFT_TYPE_TO_PREFIX_MAPPING"),
            _lookup("peft.peft_model", "PEFT_TYPE_TO_PREFIX_MAPPING"),
        )
        if m is not None
    ]
    weights_generic = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load") or (
        _lookup("peft.utils.save_and_load", "PEFT_TYPE_TO_PREFIX_MAPPING") is not None
    )
    missing = [
        what
        for what, ok in (
            ("the config mapping (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING)", config_mapping is not None),
            (
                "the tuner mapping (peft.peft_model.PEFT_TYPE_TO_TUNER_MAPPING or PEFT_TYPE_TO_MODEL_MAPPING)",
                tuner_mapping is not None,
            ),
            (
                "a weights loader open to other types (set_peft_model_state_dict lists its own types only)",
                weights_generic,
            ),
        )
        if not ok
    ]
    if missing:
        raise RuntimeError(
            f"goat_lora.register_with_peft(): in peft {peft.__version__} goat-lora finds no {missing[0]}; GOAT "
            f"adapters load through peft {TESTED_PEFT} (tested); pin one, or use GoatModel.from_pretrained"
        )
    config_mapping[PEFT_TYPE] = GoatPeftConfig
    tuner_mapping[PEFT_TYPE] = GoatPeftTuner
    other_tuner_mapping = _lookup("peft.mapping", "PEFT_TYPE_TO_TUNER_MAPPING")  # what 0.14's inject code reads
    if other_tuner_mapping is not None:
        other_tuner_mapping[PEFT_TYPE] = GoatPeftTuner
    for mapping in prefix_mappings:
        mapping[PEFT_TYPE] = _PREFIX
