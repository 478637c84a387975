import json
import os
import shutil

import pytest
import torch

from minillm.data.tokenizer import load_tokenizer
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

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


def saved_randomized(config: LMConfig, directory, seed: int, scale: float) -> MiniLLM:
    """A MiniLLM of `config` with perturbed weights (eval mode), saved in `directory` for a reference to load."""
    torch.manual_seed(seed)
    model = randomized(MiniLLM(config), scale=scale).eval()
    model.save_pretrained(directory)
    return model


def reference_greedy(model: torch.nn.Module, prompt_1T: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by one full forward per token, no cache (any model returning .logits: transformers')."""
    ids = prompt_1T
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


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


def head_lines(source, n: int, path):
    """Write the first n lines of `source` to `path`; returns path."""
    with open(source, encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 200 poems of the shipped corpus."""
    return head_lines(REPO / "dataset" / "pretrain.jsonl", 200, tmp_path_factory.mktemp("corpus") / "train.jsonl")


def stage_defaults(kind: str) -> dict:
    """The DEFAULTS dict of train_pretrain.py (kind='pretrain') or train_sft.py (kind='sft')."""
    import runpy

    return runpy.run_path(str(REPO / f"train_{kind}.py"))["DEFAULTS"]


def run_train_cli(kind: str, *args, capsys) -> tuple[int, str, str]:
    """train_pretrain.py / train_sft.py in this process, with the script's own stage defaults."""
    from minillm.cli import main

    code = main(kind, stage_defaults(kind), [str(a) for a in args])
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


def whole_poem_records() -> list[tuple[int, list[dict]]]:
    """(line index, conversation) of the shipped SFT records whose answer is a whole poem with its author line
    (the "full" layout), in file order: the records tiny_sft_dir is fitted to."""
    with open(REPO / "dataset" / "sft.jsonl", encoding="utf-8") as f:
        rows = [(i, json.loads(line)) for i, line in enumerate(f)]
    return [(i, r["conversations"]) for i, r in rows if "tools" not in r and "（" in r["conversations"][1]["content"]]


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory, tokenizer):
    """A 2-layer chat model fitted for 160 steps to 16 SFT examples, so that it writes real characters (at 80 steps
    on the SFT set of a969879 its greedy answers were newlines only, at 40 on the set before)."""
    from minillm.data.datasets import SFTDataset

    torch.manual_seed(0)
    config = LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, chat_trained=True)
    model = MiniLLM(config)
    data = SFTDataset(REPO / "dataset" / "sft.jsonl", tokenizer, max_length=96)
    # Fitted to the short answers (word_line, tune_open) first in the shipped set, it learns to write newlines.
    X, Y, mask = (torch.stack(t) for t in zip(*(data[i] for i, _ in whole_poem_records()[:16])))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(160):
        rows = torch.arange(8) + 8 * (step % 2)
        loss = model(X[rows], labels=Y[rows], loss_mask=mask[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    directory = tmp_path_factory.mktemp("tiny_sft")
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


class LiveServer:
    """serve.py's app on 127.0.0.1 in a background thread: .url, .scheduler, .tokenizer, .model."""

    def __init__(self, model_dir, max_batch: int = 16, context: int | None = None, max_waiting: int = 256,
                 api_key: str | None = None, max_body_bytes: int = 1 << 20, body_timeout: float = 30.0,
                 speculation=None):
        import socket
        import threading

        import uvicorn

        from minillm.infer.server import ServerConfig, create_app
        from minillm.infer.serving import Scheduler

        self.model = MiniLLM.from_pretrained(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.scheduler = Scheduler(self.model, max_batch, context or self.model.config.max_position_embeddings,
                                   max_waiting, speculation=speculation)
        app = create_app(self.scheduler, self.tokenizer, ServerConfig("tiny", api_key, max_body_bytes,
                                                                      body_timeout=body_timeout))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) what this run cannot or did not ask to run: tests marked gpu without CUDA (the report
    header says so), and tests marked slow unless `-m` names them."""
    def deselect(marker: str) -> None:
        chosen = [item for item in items if item.get_closest_marker(marker)]
        if chosen:
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
            config.hook.pytest_deselected(items=chosen)

    if not torch.cuda.is_available():
        deselect("gpu")
    if "slow" not in (config.getoption("markexpr") or ""):
        deselect("slow")


def pytest_report_header(config) -> str:
    """One line on the GPU tests."""
    return ("gpu tests: run (CUDA " + torch.version.cuda + ")" if torch.cuda.is_available()
            else "gpu tests: deselected (torch sees no CUDA device)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """MINILLM_NO_SKIPS=1 (set by CI) turns every skip into a failure: a missing extra or tool must not pass
    silently where everything is meant to be installed. Users without the extras keep their skips."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MINILLM_NO_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under MINILLM_NO_SKIPS=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (importorskip, allow_module_level)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MINILLM_NO_SKIPS") == "1":
        report.outcome = "failed"
