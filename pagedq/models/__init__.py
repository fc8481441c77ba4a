"""Model implementations and checkpoint loading."""

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .loader import load_model

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "load_model"]
