"""minillm: train small decoder-only language models end to end, in plain PyTorch.

The names below (and `minillm.train`'s TrainConfig, TrainResult and train) are the stable API; deeper
module paths may move between versions.
"""

from minillm.data.datasets import PretrainDataset, SFTDataset
from minillm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from minillm.eval.perplexity import PerplexityResult, evaluate_perplexity
from minillm.infer.chat import ChatSession, StreamDecoder, StreamingAnswer
from minillm.infer.engine import sample_groups
from minillm.infer.generation import generate
from minillm.infer.speculative import Speculation
from minillm.model.config import LMConfig
from minillm.model.lora import apply_lora, load_adapter, merge_lora, save_adapter
from minillm.model.model import MiniLLM

__all__ = ["ChatSession", "LMConfig", "MiniLLM", "PerplexityResult", "PretrainDataset", "SFTDataset", "Speculation",
           "StreamDecoder", "StreamingAnswer", "Tokenizer", "apply_lora", "evaluate_perplexity", "generate",
           "load_adapter", "load_tokenizer", "merge_lora", "sample_groups", "save_adapter", "train_tokenizer"]
