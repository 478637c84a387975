"""minillm: train small decoder-only language models end to end, in plain PyTorch."""

from minillm.config import LMConfig
from minillm.generation import generate
from minillm.model import MiniLLM

__all__ = ["LMConfig", "MiniLLM", "generate"]
