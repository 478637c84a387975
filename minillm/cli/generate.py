"""generate.py's logic: the flags, the one-shot answer and the interactive chat, streamed to the console."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from minillm.cli import (
    BAD_INPUT,
    CliError,
    add_inference_flags,
    add_model_flags,
    default_context,
    load_trained,
    report,
)
from minillm.cli.speculation import add_speculation_flags, check_speculation_flags, load_speculation
from minillm.data.tokenizer import declares_chat_template
from minillm.device import inference_dtype, resolve_device
from minillm.infer.chat import ChatSession, ContextError, StreamingAnswer
from minillm.infer.generation import check_sampling
from minillm.infer.poem_tools import select_tools
from minillm.infer.tool_loop import MAX_TOOL_TURNS, run_with_tools
from minillm.model.model import MiniLLM

PROG = "generate.py"
MAX_NEW_TOKENS = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a trained model. With --prompt: one answer, streamed as it is produced. "
                    "Without: an interactive chat read line by line from stdin (a pipe works too); /reset "
                    "clears the history, /exit or Ctrl-D quits. Answers stop at the end of the turn (<|im_end|>, or "
                    "the template's own marker) or of the text. "
                    "Only the generated text goes to stdout; notices and the speed line go to stderr.")
    add_model_flags(p)
    p.add_argument("--prompt", default=None,
                   help="answer this one prompt and exit; without it, chat interactively")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text instead of rendering it with the chat template "
                        "(for pretrained-only models). Interactively, each line is continued on its own")
    p.add_argument("--system", default=None, help="system prompt put before the conversation (chat mode only)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="most tokens per answer; also reserved in the context, so the prompt (and in chat the "
                        f"history) may use the context minus this (default: {MAX_NEW_TOKENS}, or half the context "
                        "when that is less)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context to use, at most the model's max_position_embeddings (default: the "
                        "context the model was trained on, as train_*.py record it, else max_position_embeddings; "
                        "serve.py's rule)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 is greedy (always the most likely token) (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=0,
                   help="sample only among the k most likely tokens; 0 disables (default: %(default)s)")
    p.add_argument("--top_p", type=float, default=0.9,
                   help="nucleus sampling: sample among the most likely tokens whose probabilities add up to "
                        "top_p; 1 disables (default: %(default)s)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="divide positive logits (multiply negative ones) of tokens already in the sequence by "
                        "this; 1 disables, ~1.1 curbs the loops small models fall into (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling random generator: the same seed, model and flags give the same "
                        "text (default: a fresh random seed)")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="offer these tools to the model, comma-separated, or all (search_poems: the shipped corpus "
                        "by title, author or line; rhyme: pinyin, final, tone of characters). Its calls are run, "
                        "their results fed back, up to --max_tool_turns times; calls and results go to stderr")
    p.add_argument("--max_tool_turns", type=int, default=MAX_TOOL_TURNS,
                   help="model turns per answer that may call tools (default: %(default)s)")
    add_inference_flags(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); beside other work on a small machine "
                        "fewer threads can be several times faster")
    add_speculation_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="run the decode steps through torch.compile: the first answer waits for the "
                        "compilation (10-30 s on a CPU), later tokens come 3x faster on a 2-core CPU "
                        "(bench/RESULTS.md); always on with --quantize int8")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Reject flag values that make no sense, before anything is loaded."""
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CliError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise CliError(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise CliError(f"--seed must be in [0, 2**64), got {args.seed}")
    if sys.stdout is None:
        raise CliError("standard output is closed: the answers would have nowhere to go")
    try:
        check_sampling(args.temperature, args.top_p, args.repetition_penalty)
    except ValueError as e:
        raise CliError(f"--{e}") from None
    for flag in ("prompt", "system"):
        bad = not_utf8(getattr(args, flag))
        if bad:
            raise CliError(f"--{flag} is not valid UTF-8 text ({bad})")
    if args.raw and args.system is not None:
        raise CliError("--system needs the chat template; it cannot be combined with --raw")
    if args.raw and args.tools:
        raise CliError("--tools needs the chat template; it cannot be combined with --raw")
    if args.max_tool_turns < 1:
        raise CliError(f"--max_tool_turns must be >= 1, got {args.max_tool_turns}")
    if args.context is not None and args.context < 2:
        raise CliError(f"--context must be >= 2, got {args.context}")
    check_speculation_flags(args)
    if (args.draft_model or args.prompt_lookup) and (args.tools or args.repetition_penalty != 1.0):
        raise CliError("speculative decoding (--draft_model, --prompt_lookup) does not combine with "
                       f"{'--tools' if args.tools else '--repetition_penalty'} yet")


def not_utf8(text: str | None) -> str | None:
    """Where `text` (argv or stdin, decoded with surrogateescape) holds bytes that are not UTF-8, or None."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        return f"byte 0x{raw.hex()} at character {e.start + 1}"
    return None


class Console:
    """Where text goes: answers to stdout, notices and stats to stderr (dim when stderr is a terminal)."""

    def __init__(self) -> None:
        self.dim = sys.stderr is not None and sys.stderr.isatty()

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(self, text: str) -> None:
        sys.stdout.flush()
        print(f"\x1b[2m{text}\x1b[0m" if self.dim else text, file=sys.stderr, flush=True)


def pick_tools(names: str | None, tokenizer) -> dict:
    """The tools --tools names (all: every poetry tool); CliError for an unknown name or a tokenizer without them."""
    if not names:
        return {}
    if not tokenizer.tool_ids and tokenizer.template is None:
        raise CliError("--tools: this model's tokenizer has no tool-call tokens (it was made before tool calling)")
    try:
        return select_tools(names)
    except ValueError as e:
        raise CliError(f"--tools: {e}") from None


def load(args: argparse.Namespace):
    """Model, tokenizer, device and tokenizer directory, with one clear error for each thing that is missing."""
    device = resolve_device(args.device)
    model, tokenizer, tokenizer_dir = load_trained(args, device, inference_dtype(args.dtype, device))
    return model, tokenizer, device, tokenizer_dir


class Generator:
    """Answers prompts with the sampling flags, streaming them to the console."""

    def __init__(self, args: argparse.Namespace, model: MiniLLM, tokenizer, device: torch.device,
                 console: Console) -> None:
        self.args, self.model, self.tokenizer, self.console = args, model, tokenizer, console
        limit = model.config.max_position_embeddings
        self.context = default_context(model.config)[0] if args.context is None else args.context
        if self.context > limit:
            raise CliError(f"--context {self.context} exceeds the model's max_position_embeddings ({limit})")
        if args.max_new_tokens is None:
            args.max_new_tokens = min(MAX_NEW_TOKENS, self.context // 2)
        self.budget = self.context - args.max_new_tokens
        if self.budget < 1:
            raise CliError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the "
                           f"context of {self.context} tokens; use a smaller value")
        self.rng = None
        if args.seed is not None:
            self.rng = torch.Generator(device=device).manual_seed(args.seed)
        self.tools = pick_tools(args.tools, tokenizer)
        self.schemas = [t.schema() for t in self.tools.values()] or None
        self.speculation = load_speculation(args, model, tokenizer, self.context, device, self.console.note)

    def session(self) -> ChatSession:
        """A new chat history, with the system prompt and the tools offered."""
        return ChatSession(self.tokenizer, self.budget, system=self.args.system, tools=self.schemas)

    def answer_with_tools(self, history: list[dict]) -> list[dict]:
        """Answer the last message with the tools on: calls and results noted on stderr, the answer on stdout;
        returns the messages to add to the history."""
        a = self.args
        note = self.console.note
        run = run_with_tools(self.model, self.tokenizer, history, self.tools, a.max_new_tokens, a.max_tool_turns,
                             a.temperature, self.context, generator=self.rng, top_k=a.top_k or None,
                             top_p=a.top_p if a.top_p < 1 else None, repetition_penalty=a.repetition_penalty,
                             on_call=lambda call, result: note(f"[{call.name}({json.dumps(call.arguments, ensure_ascii=False)})"
                                                               f" -> {result}]"))
        self.console.write(run.answer + "\n")
        if run.exhausted:
            note(f"[still calling tools after --max_tool_turns {a.max_tool_turns}, or out of context: stopped]")
        return run.messages

    def too_long(self, n: int) -> str:
        """The message for a prompt of n tokens that does not fit."""
        return (f"the prompt is {n} tokens, but the context of {self.context} tokens leaves "
                f"{self.budget} for it after reserving --max_new_tokens {self.args.max_new_tokens}; "
                "shorten the prompt or lower --max_new_tokens")

    def answer(self, prompt_ids: list[int]) -> str:
        """Stream one answer to stdout, then the speed line to stderr; returns the answer's text."""
        a = self.args
        answer = StreamingAnswer(self.model, self.tokenizer, prompt_ids, a.max_new_tokens,
                                 temperature=a.temperature, top_k=a.top_k or None,
                                 top_p=a.top_p if a.top_p < 1 else None,
                                 repetition_penalty=a.repetition_penalty, generator=self.rng,
                                 compile=a.compile or a.quantize == "int8", speculation=self.speculation)
        pieces = iter(answer)
        interrupted = False
        try:
            for piece in pieces:
                self.console.write(piece)
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the program
            interrupted = True
        finally:
            pieces.close()
            self.console.write("\n")
        end = (", interrupted" if interrupted else
               "" if answer.stopped else f", cut at --max_new_tokens {a.max_new_tokens}")
        drafted = ""
        if self.speculation is not None:
            stats = self.speculation.stats
            drafted = (f", {stats.acceptance:.0%} of {stats.proposed} drafted tokens kept" if stats.proposed
                       else ", nothing drafted")
        self.console.note(f"[{answer.generated} tokens in {answer.seconds:.2f} s, "
                          f"{answer.tokens_per_second:.1f} tokens/s{end}{drafted}]")
        return answer.text

    def raw_ids(self, text: str) -> list[int]:
        """Prompt ids of plain text to continue."""
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ContextError("the prompt is empty")
        if len(ids) > self.budget:
            raise ContextError(self.too_long(len(ids)))
        return ids


def one_shot(gen: Generator, args: argparse.Namespace) -> None:
    """Answer --prompt once."""
    if args.raw:
        ids = gen.raw_ids(args.prompt)
    else:
        session = gen.session()
        question = {"role": "user", "content": args.prompt}
        ids = session.encode(session.messages + [question])
        if len(ids) > gen.budget:
            raise ContextError(gen.too_long(len(ids)))
        if gen.tools:
            gen.answer_with_tools(session.messages + [question])
            return
    gen.answer(ids)


def read_line(interactive: bool) -> str | None:
    """One line from stdin (None at end of input); with a terminal, a '>>> ' prompt and line editing."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat(gen: Generator, args: argparse.Namespace) -> None:
    """Interactive loop: read a line, stream the answer, keep the history within the context."""
    if sys.stdin is None or sys.stdin.closed:
        raise CliError("standard input is closed: give --prompt, or chat from a terminal or a pipe")
    # A line that is not UTF-8 is reported and skipped instead of ending the chat and losing the history.
    if hasattr(sys.stdin, "reconfigure"):  # a real text stream (not a StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history in input())
        except ImportError:
            pass
    session = gen.session()
    mode = "each line is continued as plain text" if args.raw else "/reset clears the history"
    gen.console.note(f"chatting with {args.model} ({gen.context}-token context); {mode}; /exit or Ctrl-D quits")
    while True:
        try:
            line = read_line(interactive)
        except KeyboardInterrupt:
            print()
            return
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        bad = not_utf8(line)
        if bad:
            gen.console.note(f"(not sent: the line is not valid UTF-8 text: {bad})")
            continue
        if line.strip() == "/reset":
            session.reset()
            gen.console.note("(history cleared)")
            continue
        try:
            if args.raw:
                gen.answer(gen.raw_ids(line))
                continue
            dropped = session.add_user(line)
        except ContextError as e:
            gen.console.note(f"(not sent: {e})")
            continue
        if dropped:
            gen.console.note(f"(dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} "
                             f"to keep the conversation within the context)")
        if gen.tools:
            session.add_messages(gen.answer_with_tools(session.messages))
            continue
        text = gen.answer(session.prompt_ids())
        session.add_assistant(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input gives one message on stderr and exit status 1, no traceback."""
    args = parse_args(argv)
    console = Console()
    try:
        check_flags(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer, device, tokenizer_dir = load(args)
        if not args.raw and not declares_chat_template(tokenizer_dir):
            console.note(f"note: the tokenizer of {args.model} declares no chat template; for a "
                         "pretrained-only model, --raw continues plain text")
        elif not args.raw and model.config.chat_trained is False:
            console.note(f"note: {args.model} was never fine-tuned on chat (no SFT recorded in its "
                         "config.json), so its answers may not follow the template; --raw continues plain text")
        gen = Generator(args, model, tokenizer, device, console)
        if args.prompt is not None:
            one_shot(gen, args)
        else:
            chat(gen, args)
    except BAD_INPUT as e:
        return report(PROG, e)
    except KeyboardInterrupt:
        return 130
    return 0

