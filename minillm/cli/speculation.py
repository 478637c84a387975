"""The speculative-decoding flags and their drafter, shared by generate.py and serve.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from minillm.cli.loading import CliError, check_same_tokenizer
from minillm.data.tokenizer import Tokenizer
from minillm.infer.speculative import Speculation
from minillm.model.model import MiniLLM


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    """--draft_model, --prompt_lookup and --num_draft_tokens, in their own group."""
    spec = p.add_argument_group("speculative decoding (the same text greedy, the same distribution sampled)")
    spec.add_argument("--draft_model", default=None, metavar="DIR",
                      help="a smaller model with this model's tokenizer proposes --num_draft_tokens tokens, the "
                           "model checks them in one forward pass (minillm/infer/speculative.py)")
    spec.add_argument("--prompt_lookup", action="store_true",
                      help="propose the tokens that followed the last earlier occurrence of the text's final "
                           "n-gram (no draft model; fast when answers repeat their context)")
    spec.add_argument("--num_draft_tokens", type=int, default=4, metavar="K",
                      help="tokens proposed per check (default: %(default)s)")


def check_speculation_flags(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, before anything loads."""
    if args.num_draft_tokens < 1:
        raise CliError(f"--num_draft_tokens must be >= 1, got {args.num_draft_tokens}")
    if args.draft_model and args.prompt_lookup:
        raise CliError("--draft_model and --prompt_lookup are two drafters: choose one")


def load_speculation(args: argparse.Namespace, model: MiniLLM, tokenizer: Tokenizer, context: int,
                     device: torch.device, warn: Callable[[str], None]) -> Speculation | None:
    """The speculation --draft_model or --prompt_lookup asks for, the draft loaded and checked; else None."""
    if not (args.draft_model or args.prompt_lookup):
        return None
    if args.num_draft_tokens >= context:
        raise CliError(f"--num_draft_tokens {args.num_draft_tokens} must be less than the context ({context})")
    if args.prompt_lookup:
        return Speculation(None, args.num_draft_tokens)
    if not Path(args.draft_model).is_dir():
        raise CliError(f"--draft_model {args.draft_model}: no such model directory")
    check_same_tokenizer(tokenizer, args.model, Path(args.draft_model), "--draft_model")
    draft = MiniLLM.from_pretrained(args.draft_model, dtype=next(model.parameters()).dtype, device=device)
    if draft.config.vocab_size != model.config.vocab_size:
        raise CliError(f"--draft_model {args.draft_model} has {draft.config.vocab_size:,} token embeddings, "
                       f"{args.model} {model.config.vocab_size:,}: they must share the vocabulary")
    if draft.num_parameters() >= model.num_parameters():
        warn(f"warning: the draft ({draft.num_parameters() / 1e6:.1f}M parameters) is not smaller than the model "
             f"({model.num_parameters() / 1e6:.1f}M): it will not be faster")
    return Speculation(draft.eval(), args.num_draft_tokens)
