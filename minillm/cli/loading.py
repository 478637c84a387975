"""Flags and loading for the scripts that use a trained model (eval_ppl.py, eval_tasks.py, generate.py, serve.py,
export_gguf.py), and the error conventions every script shares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.data.datasets import check_vocab
from minillm.data.tokenizer import Tokenizer, load_tokenizer
from minillm.device import DTYPES
from minillm.files import check_writable, read_json
from minillm.model.config import LMConfig
from minillm.model.linear import quantize_int8
from minillm.model.lora import load_adapter, merge_lora
from minillm.model.model import MiniLLM

EXIT_ERROR = 1
EXIT_INTERRUPTED = 3  # interrupted by a signal with a checkpoint saved: `a && b` does not go on


REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def resolve_path(path: str | None) -> Path | None:
    """Paths given relative to the repository work from any current directory when the file is there."""
    if not path:
        return None
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


class CliError(Exception):
    """Bad input, reported as one line on stderr."""


def add_model_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--model (required unless given a default), --adapter and --tokenizer, for scripts that use a trained model."""
    p.add_argument("--model", required=default is None, default=default,
                   help="model directory (config.json + model.safetensors) as written by train_pretrain.py / "
                        "train_sft.py, or any Hugging Face Llama/Qwen2 checkpoint MiniLLM.from_pretrained loads"
                        + ("" if default is None else f" (default: {default})"))
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (adapter_config.json + adapter_model.safetensors, PEFT layout, "
                        "as train_*.py --lora writes) applied on top of --model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (tokenizer.json); default: the tokenizer saved beside the weights "
                        "in --model (or beside --adapter); 'default' uses the tokenizer shipped in minillm/assets")


def add_inference_flags(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    """--device and --dtype, as generate.py and serve.py take them (weights and KV cache in one dtype)."""
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", default=dtype, choices=["auto", *DTYPES],
                   help=f"dtype of the weights and the KV cache (default: {dtype}; auto = bfloat16 on GPUs that "
                        "support it, else float16; float32 on every CPU, so the text does not depend on the CPU)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 at load (one scale per output row; activations and the KV cache "
                        "keep --dtype): a quarter of float32's weight bytes. The files on disk do not change. "
                        "Fast at batch 1 through --compile's decode path; batches and prefill dequantize each "
                        "matrix per step, so there it saves memory, not time (default: %(default)s)")


# The specific failures of bad input in the scripts that use a trained model; anything else is a bug and
# keeps its traceback.
BAD_INPUT = (CliError, OSError, ValueError, KeyError)


def report(prog: str, e: Exception) -> int:
    """Print a bad-input error as one line on stderr; the exit status for it."""
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    if path is None:
        return
    if Path(path).is_dir():
        raise CliError(f"{flag} {path} is a folder; give a file name such as {Path(path) / 'result.json'}")
    check_writable(Path(path).parent, f"{flag}'s folder")


def add_model_end_ids(tokenizer: Tokenizer, model_dir: Path) -> None:
    """Under an outside template, the model's own generation_config end ids end a turn too (Llama 3.1's
    <|eom_id|>), for generation and for the generation_config a training stage writes."""
    generation = model_dir / "generation_config.json"
    if tokenizer.template is not None and generation.is_file():
        eos = read_json(generation).get("eos_token_id")
        tokenizer.add_end_ids(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])


def default_context(config: LMConfig) -> tuple[int, str]:
    """The context a model was trained on (train_*.py record it in config.json), else its
    max_position_embeddings; and where that number came from. Longer windows would measure extrapolation."""
    limit, trained = config.max_position_embeddings, config.trained_context
    if trained:
        return min(trained, limit), "the model's training context"
    return limit, "max_position_embeddings; no training context recorded"


def check_same_tokenizer(tokenizer: Tokenizer, source: str, other_dir: Path, role: str) -> None:
    """Refuse a second model (a DPO/GRPO reference; later a teacher or a draft) whose tokenizer differs from the
    one in use: its log-probabilities would be of other tokens under the same ids. Both vocabularies are named."""
    if not (other_dir / "tokenizer.json").is_file():
        return  # nothing to compare: the vocabulary size is still checked against the weights
    other = load_tokenizer(other_dir)
    if other.fingerprint() != tokenizer.fingerprint():
        raise CliError(f"{role} {other_dir} has another tokenizer ({other.vocab_size:,} tokens, "
                       f"{other.fingerprint()[:12]}) than {source} ({tokenizer.vocab_size:,} tokens, "
                       f"{tokenizer.fingerprint()[:12]}): the same ids would name other tokens; use a {role.lstrip('-')} "
                       "trained with this tokenizer")


def load_trained(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None = None
                 ) -> tuple[MiniLLM, Tokenizer, Path | None]:
    """(model with any --adapter merged in, tokenizer, tokenizer directory or None for the shipped one)."""
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if args.tokenizer is None:
        # train_*.py --lora saves the tokenizer beside the adapter, not beside the base model's weights.
        beside = [d for d in (model_dir, args.adapter and Path(args.adapter))
                  if d and (d / "tokenizer.json").is_file()]
        if not beside:
            raise ValueError(f"{model_dir} has no tokenizer.json beside the weights; pass --tokenizer DIR "
                             "(or --tokenizer default for the tokenizer shipped with minillm)")
        tokenizer_dir = beside[0]
    else:
        tokenizer_dir = None if args.tokenizer == "default" else Path(args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.check_template()  # a broken or hostile template fails now, in one line naming its file
    add_model_end_ids(tokenizer, model_dir)
    model = MiniLLM.from_pretrained(model_dir, dtype=dtype, device=device)
    if args.adapter:
        model = merge_lora(load_adapter(model, args.adapter))  # folded in: the same function, no per-token cost
    if getattr(args, "quantize", "none") == "int8":
        quantize_int8(model)  # after the merge, so that an adapter is quantized with its base
    check_vocab(tokenizer, model.config.vocab_size)
    return model.eval(), tokenizer, tokenizer_dir
