"""minillm: train small decoder-only language models end to end, in plain PyTorch."""

from minillm.chat import ChatSession, StreamDecoder, StreamingAnswer
from minillm.config import LMConfig
from minillm.evaluation import PerplexityResult, evaluate_perplexity
from minillm.generation import generate
from minillm.lora import apply_lora, load_adapter, merge_lora, save_adapter
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["ChatSession", "LMConfig", "MiniLLM", "PerplexityResult", "StreamDecoder", "StreamingAnswer", "Tokenizer",
           "apply_lora", "evaluate_perplexity", "generate", "load_adapter", "load_tokenizer", "merge_lora",
           "save_adapter", "train_tokenizer"]
