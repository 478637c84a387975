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


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY_ARGS = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
             "--num_key_value_heads", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 200 poems of the shipped corpus."""
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(REPO / "dataset" / "pretrain.jsonl", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(200)), encoding="utf-8")
    return path


def run_train_cli(kind: str, *args, capsys) -> tuple[int, str, str]:
    """train_pretrain.py / train_sft.py in this process, with the script's own stage defaults."""
    import runpy

    from minillm.cli import main

    defaults = runpy.run_path(str(REPO / f"train_{kind}.py"))["DEFAULTS"]
    code = main(kind, defaults, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_pretrain(out, corpus, *extra, capsys) -> tuple[int, str, str]:
    """A few steps of a tiny model on `corpus`, logging every step, without held-out data."""
    return run_train_cli("pretrain", "--data_path", corpus, "--eval_data", "", "--out_dir", out, "--max_length",
                         "32", "--batch_size", "2", "--log_every", "1", *TINY_ARGS, *extra, capsys=capsys)


def load_script(name: str):
    """A top-level script (generate.py, eval_ppl.py) imported as a module, without running its main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_cli", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
