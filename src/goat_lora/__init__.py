"""goat-lora: GOAT (ICML 2025) LoRA mixture-of-experts adapters for PyTorch and transformers models."""

__version__ = "0.1.0"

from .config import AuxLossForm, GoatConfig, InitMode, ScalingMode, SvdMethod  # noqa: E402
from .layer import GoatLayer  # noqa: E402
from .model import GoatModel, get_goat_model  # noqa: E402

__all__ = [
    "AuxLossForm",
    "GoatConfig",
    "GoatLayer",
    "GoatModel",
    "InitMode",
    "ScalingMode",
    "SvdMethod",
    "__version__",
    "get_goat_model",
]
