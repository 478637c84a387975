import shutil

import pytest
import torch

from minillm.config import LMConfig
from minillm.model import MiniLLM
from minillm.tokenizer import load_tokenizer

# torch.compile on the CPU builds C++ kernels: without a compiler those tests cannot run.
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


def randomized(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (norm weights included) so that parity tests compare non-trivial functions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny_config() -> LMConfig:
    return LMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def tiny_model(tiny_config) -> MiniLLM:
    torch.manual_seed(0)
    return randomized(MiniLLM(tiny_config)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped default tokenizer."""
    return load_tokenizer()


def late_specials_backend(texts: list[str], specials: list[str], vocab_size: int = 300):
    """A Qwen2-like `tokenizers` backend: byte-level BPE first, the special tokens appended at the end."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(specials)
    return backend
