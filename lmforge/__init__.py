"""lmforge: the Transformer and the language models built on it, end to end."""

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.models import build_model
from lmforge.models.hf import load, save_hf

__version__ = "0.1.0"

__all__ = ["ModelConfig", "build_model", "generate", "load", "save_hf", "__version__"]
