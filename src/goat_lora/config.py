"""GoatConfig: every knob of a GOAT adapter, validated when built, round-tripped through JSON.

No torch here: the config is read by the command line, the reports and the checkpoint code alike.
Formulas behind each field are in ``goat_lora.functional`` and in docs/spec.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .files import atomic_write_text


class InitMode(str, Enum):
    """Which singular components expert j starts from (0-based; t = min(m, n) // E, d = r / E)."""

    GOAT = "goat"  # [j*t, j*t + d): the leading d components of segment j (paper; default)
    GOAT_MINI = "goat_mini"  # [(j+1)*t - d, (j+1)*t): the trailing d of segment j (public code)
    PRINCIPAL = "principal"  # the top r components, split consecutively (PiSSA-like ablation)
    MINOR = "minor"  # the bottom r components, split consecutively (MiLoRA-like ablation)
    RANDOM = "random"  # E random non-overlapping blocks of d components (seeded)
    ZERO = "zero"  # A Kaiming-uniform, B = 0, no residual (plain LoRA-MoE, i.e. MoLoRA)


class ScalingMode(str, Enum):
    """How the adapter scale s is chosen (d = r / E is the rank of one expert)."""

    GOAT = "goat"  # s = sqrt(3 * eta * n / d) (paper, Theorem 3.5; default)
    ALPHA = "alpha"  # s = lora_alpha / d (what the public training scripts ran)
    RSLORA = "rslora"  # s = lora_alpha / sqrt(d)


class AuxLossForm(str, Enum):
    """Which normalisation of the load-balancing loss (see functional.load_balance_loss)."""

    PUBLIC = "public"  # E * sum_j (count_j / T) * P_j, k at balance (public code; default)
    PAPER = "paper"  # sum_j f_j P_j with f_j = E / (k T) * count_j, 1 at balance


class RoutingMode(str, Enum):
    """How the router turns a token's expert probabilities into expert weights (functional.route)."""

    TOP_K = "top_k"  # the k most probable experts, weights renormalised to sum to 1 (paper; default)
    TOP_P = "top_p"  # the fewest experts, most probable first, whose probabilities sum to >= top_p; renormalised
    SHARED = "shared"  # expert 0 always on with weight 1 (DeepSeekMoE's shared expert) + top-k of the other E - 1


class QuantizeKind(str, Enum):
    """How GOAT quantizes the frozen base W0 - W_res itself (bitsandbytes; goat_lora.quant)."""

    NF4 = "nf4"  # 4-bit NormalFloat, blocks of 64 weights (QLoRA's data type)
    FP4 = "fp4"  # 4-bit float, blocks of 64
    INT8 = "int8"  # LLM.int8(): one absmax per output row


class SvdMethod(str, Enum):
    """How the needed singular components are computed at initialisation."""

    AUTO = "auto"  # "exact" for small layers, "gram" for large ones
    EXACT = "exact"  # one full float32/float64 SVD per matrix (what the public code does)
    GRAM = "gram"  # eigendecomposition of the smaller Gram matrix W W^T or W^T W, batched per shape


def _choices(enum_cls: type[Enum]) -> str:
    return " | ".join(repr(member.value) for member in enum_cls)


def _as_enum(enum_cls: type[Enum], name: str, value: Any) -> Enum:
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"GoatConfig.{name}={value!r} is not allowed; choose one of {_choices(enum_cls)}") from None


@dataclass
class GoatConfig:
    """Configuration of a GOAT adapter (E LoRA experts, a top-k router, SVD-segment init).

    Defaults are the paper's (E = 8, k = 2, rho = 10, eta = 1, dropout 0.05, aux coefficient 1e-3).
    """

    r: int = 8  # total rank over all experts; each expert has rank d = r / num_experts
    num_experts: int = 8  # E
    top_k: int = 2  # k experts per token ("top_k"); k routed experts beside the shared one ("shared")
    routing: str = "top_k"  # RoutingMode: "top_k", "top_p" or "shared" (the paper's routing ablation)
    top_p: float = 0.25  # "top_p" only: probability mass a token's experts must reach (the paper's ablation: 0.25)
    init: str = "goat"  # InitMode: which singular components each expert starts from
    scaling: str = "goat"  # ScalingMode: how s is chosen
    lora_alpha: float = 16.0  # used by scaling "alpha" and "rslora" only
    eta: float = 1.0  # ratio of full fine-tuning to LoRA learning rate in s = sqrt(3 eta n / d)
    rho: float = 10.0  # prior shrink: s * B_j A_j = U_j S_j V_j^T / rho
    init_cof: float | None = None  # residual coefficient c of the routed experts; None: their E[w_j] (1/E for top_k
    # and top_p, 1/(E-1) for "shared"); the shared expert's is always its weight, 1 (functional.expected_expert_weights)
    per_expert_scaling: bool = False  # GOAT-s: s_j = s * sqrt(sigma_0 / sigma_j) (paper appendix)
    dropout: float = 0.05  # dropout on the experts' input
    target_modules: str | list[str] = "all-linear"  # "all-linear", a list of name suffixes, or a regex
    exclude_modules: str | list[str] | None = None  # same forms as target_modules
    modules_to_save: list[str] | None = None  # name suffixes of modules trained in full (e.g. "classifier")
    aux_loss_coef: float = 1e-3  # the training loop adds aux_loss_coef * model.aux_loss()
    aux_loss_form: str = "public"  # AuxLossForm
    aux_loss_ignore_padding: bool = False  # count only tokens whose attention_mask is 1
    svd_method: str = "auto"  # SvdMethod
    quantize: str | None = None  # QuantizeKind: the base becomes Q(W0 - W_res), quantized from float32 after the
    # factors come from W0 (QPiSSA's order; needs bitsandbytes). None: a full-precision base stays so, and a base
    # that arrives quantized (bitsandbytes layers) is kept as it is, W_res x subtracted at run time (goat_lora.quant)
    double_quant: bool = True  # quantize "nf4" / "fp4" only: quantize the block absmaxes too (QLoRA's recipe)
    seed: int = 0  # seeds router init, the "random" init and the "zero" init's A
    base_model_name_or_path: str | None = None  # recorded for loading; not used by the math

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        for name in ("r", "num_experts", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GoatConfig.{name}={value!r} must be an integer")
        if self.r < 1:
            raise ValueError(f"GoatConfig.r={self.r} must be >= 1")
        if self.num_experts < 1:
            raise ValueError(f"GoatConfig.num_experts={self.num_experts} must be >= 1")
        if self.r % self.num_experts != 0:
            raise ValueError(
                f"GoatConfig.r={self.r} must be divisible by num_experts={self.num_experts} "
                f"(each expert has rank r / num_experts); try r={self.num_experts * max(1, self.r // self.num_experts)}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"GoatConfig.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        self.routing = _as_enum(RoutingMode, "routing", self.routing).value
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0  # also refuses nan
        ):
            raise ValueError(f"GoatConfig.top_p={self.top_p!r} must be in (0, 1]")
        if self.routing == RoutingMode.SHARED.value:
            if self.num_experts < 2:
                raise ValueError(
                    f"GoatConfig.routing='shared' needs num_experts >= 2 (one shared + at least one routed); "
                    f"got num_experts={self.num_experts}"
                )
            if self.top_k > self.num_experts - 1:
                raise ValueError(
                    f"GoatConfig.top_k={self.top_k} with routing='shared' must be between 1 and num_experts - 1="
                    f"{self.num_experts - 1} (the routed experts)"
                )
        self.init = _as_enum(InitMode, "init", self.init).value
        self.scaling = _as_enum(ScalingMode, "scaling", self.scaling).value
        self.aux_loss_form = _as_enum(AuxLossForm, "aux_loss_form", self.aux_loss_form).value
        self.svd_method = _as_enum(SvdMethod, "svd_method", self.svd_method).value
        if self.quantize is not None:
            self.quantize = _as_enum(QuantizeKind, "quantize", self.quantize).value
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"GoatConfig.double_quant={self.double_quant!r} must be true or false")
        for name in ("lora_alpha", "eta", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"GoatConfig.{name}={value!r} must be a finite number > 0")
        if self.init_cof is not None and (
            isinstance(self.init_cof, bool)
            or not isinstance(self.init_cof, (int, float))
            or not math.isfinite(self.init_cof)
        ):
            raise ValueError(f"GoatConfig.init_cof={self.init_cof!r} must be a finite number or None (= 1/num_experts)")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"GoatConfig.dropout={self.dropout!r} must be in [0, 1)")
        if (
            isinstance(self.aux_loss_coef, bool)
            or not isinstance(self.aux_loss_coef, (int, float))
            or not math.isfinite(self.aux_loss_coef)
            or self.aux_loss_coef < 0
        ):
            raise ValueError(f"GoatConfig.aux_loss_coef={self.aux_loss_coef!r} must be a finite number >= 0")
        if self.per_expert_scaling and self.init == InitMode.ZERO.value:
            raise ValueError(
                "GoatConfig.per_expert_scaling=True needs singular values; it is not allowed with init='zero'"
            )
        self.target_modules = self._check_targets("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = self._check_targets("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(n, str) and n for n in self.modules_to_save):
                raise ValueError(f"GoatConfig.modules_to_save={self.modules_to_save!r} must be a list of module names")
            self.modules_to_save = list(self.modules_to_save)

    @staticmethod
    def _check_targets(name: str, value: Any, allow_none: bool) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, str):
            if not value:
                raise ValueError(f"GoatConfig.{name}='' must be 'all-linear', a regex, or a list of module names")
            return value
        if isinstance(value, (list, tuple, set)) and value and all(isinstance(n, str) and n for n in value):
            return sorted(value) if isinstance(value, set) else list(value)
        raise ValueError(
            f"GoatConfig.{name}={value!r} must be 'all-linear', a regex, or a non-empty list of module names"
        )

    # ---- derived values -----------------------------------------------------------------------
    @property
    def expert_rank(self) -> int:
        """d = r / E, the rank of one expert."""
        return self.r // self.num_experts

    @property
    def num_shared_experts(self) -> int:
        """Experts that every token uses (expert 0 in "shared" mode), outside the router."""
        return 1 if self.routing == RoutingMode.SHARED.value else 0

    @property
    def num_routed_experts(self) -> int:
        """R: the experts the router chooses among (its number of outputs)."""
        return self.num_experts - self.num_shared_experts

    @property
    def residual_coef(self) -> float:
        """c of the routed experts in W_res = sum_j c_j s_j B_j A_j: init_cof, or by default their expected
        weight 1/R (1/E for top_k and top_p: Lemma 3.3), which keeps E[equivalent weight] = W0."""
        return 1.0 / self.num_routed_experts if self.init_cof is None else float(self.init_cof)

    @property
    def residual_coefs(self) -> list[float]:
        """c_j for every expert j (E values): 1 for the shared expert (its weight is always 1), residual_coef
        for the routed ones. With init_cof None these are E[w_j] (functional.expected_expert_weights)."""
        return [1.0] * self.num_shared_experts + [self.residual_coef] * self.num_routed_experts

    # ---- JSON round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GoatConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a GoatConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in _METADATA_KEYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GoatConfig field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GoatConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"adapter config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the config (plus metadata such as peft_type) atomically to `path`."""
        atomic_write_text(path, self.to_json_text(extra))

    def to_json_text(self, extra: dict[str, Any] | None = None) -> str:
        """The text `save` writes: the fields plus metadata such as peft_type, sorted, indented."""
        data = {**(extra or {}), **self.to_dict()}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GoatConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter config {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            return cls.from_json(text)
        except ValueError as err:  # name the file: a folder may hold several configs
            raise ValueError(f"{str(path)!r}: {err}") from None


# Keys written next to the config for tools that read adapter_config.json (PEFT-style metadata).
_METADATA_KEYS = {"peft_type", "goat_lora_version", "task_type", "layers", "weights_sha256", "base_quantization"}
