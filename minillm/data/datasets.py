"""Datasets for pretraining and SFT, and the batching helpers that keep padding out of the compute.

Every dataset yields ``(X, Y, loss_mask)``: int64 input ids and next-token labels of length
``max_length - 1`` and a float32 mask (1 = learn this label, 0 = ignore), ready for
``MiniLLM(input_ids=X, labels=Y, loss_mask=loss_mask)``. The files are read through minillm.data.jsonl (a
malformed line is a DataError naming file:line); the packed token cache lives in minillm.data.packed, the
ChatML rendering and its mask in minillm.data.tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from minillm.data.conversation import call_json, check_tools
from minillm.data.jsonl import DataError, JsonLines, Where, get_str, text_expected

if TYPE_CHECKING:
    from minillm.data.tokenizer import Tokenizer

__all__ = [
    "DataError",
    "PretrainDataset",
    "SFTDataset",
    "check_max_length",
    "check_token_ids",
    "check_vocab",
    "dataset_identity",
    "check_learnable",
    "example_lengths",
    "scan_examples",
    "group_by_length",
    "make_example",
    "messages_from_record",
    "parse_messages",
    "trim_padding",
]


# ---------------------------------------------------------------------------------------------
# (X, Y, loss_mask) from token ids and a per-token learn mask.


def make_example(
    ids: Sequence[int], learn: Sequence[int] | None, max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncate/pad ``ids`` to max_length and shift; ``learn[j]`` says whether token j is a target.

    ``learn=None`` means every real token is learned. Padding is never learned; the mask comes from
    the true length, not from comparing with pad_id (pad_id may equal the end-of-text id).
    """
    n = min(len(ids), max_length)
    ids_T = torch.full((max_length,), pad_id, dtype=torch.long)
    ids_T[:n] = torch.as_tensor(ids[:n], dtype=torch.long)
    learn_T = torch.zeros(max_length, dtype=torch.float32)
    if learn is None:
        learn_T[:n] = 1.0
    else:
        learn_T[:n] = torch.as_tensor(learn[:n], dtype=torch.float32)
    return ids_T[:-1].clone(), ids_T[1:].clone(), learn_T[1:].clone()


def check_max_length(max_length: int) -> None:
    """ValueError unless max_length is an int >= 2 (one input and one label)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (one input and one label), got {max_length!r}")


class JsonlExamples(Dataset):
    """Examples stored one per line of a JSON-lines file, parsed when accessed: what both datasets share.

    Construction only indexes line offsets (cached as ``<path>.idx``); call :meth:`validate` to check
    the whole file up front.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, max_length: int = 512) -> None:
        check_max_length(max_length)
        self.lines = JsonLines(path)
        self.path = self.lines.path
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the ids this dataset can produce)."""
        return self.tokenizer.vocab_size

    def identity(self) -> dict[str, Any]:
        """What a resumed run must train on again: the file's size and the example count and length."""
        return {"kind": type(self).__name__, "examples": len(self), "max_length": self.max_length,
                "bytes": self.path.stat().st_size}

    def parse(self, i: int) -> object:
        """Example `i` read and checked, before tokenization."""
        raise NotImplementedError

    def validate(self) -> int:
        """Parse every line (without tokenizing); raise DataError at the first bad one; return the count."""
        for i in range(len(self)):
            self.parse(i)
        return len(self)


class PretrainDataset(JsonlExamples):
    """JSON lines with a "text" field -> (X, Y, loss_mask) of the text followed by <|endoftext|>."""

    def text(self, i: int) -> str:
        """The raw text of example ``i``."""
        obj = self.lines.record(i)
        return get_str(obj, "text", self.lines.where(i), text_expected("text"))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.tokenizer.encode(self.text(i))
        ids.append(self.tokenizer.eos_id)  # the closing end-of-text is a real, learned token
        return make_example(ids, None, self.max_length, self.tokenizer.pad_id)

    parse = text


# ---------------------------------------------------------------------------------------------
# SFT: ChatML conversations with loss on the assistant replies only.

_ROLES = ("system", "user", "assistant", "tool")
_CONV_EXPECTED = (
    '{"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


def parse_messages(turns: object, where: str | Where, key: str) -> list[dict[str, str]]:
    """Field `key` of a record as a non-empty list of {"role", "content"} messages, or a DataError naming it."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: field "{key}" must be a non-empty list of messages; expected {_CONV_EXPECTED}')
    messages = []
    for k, turn in enumerate(turns):
        at = where.sub(f": {key}[{k}]") if isinstance(where, Where) else f"{where}: {key}[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f'{at}: expected an object {{"role": ..., "content": ...}}, got {type(turn).__name__}')
        role = get_str(turn, "role", at, 'a "role" string')
        if role not in _ROLES:
            raise DataError(f"{at}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        if role == "assistant" and turn.get("tool_calls"):  # calls, with or without text before them
            calls = turn["tool_calls"]
            try:
                if not isinstance(calls, list):
                    raise ValueError("tool_calls must be a list")
                for c, call in enumerate(calls):
                    call_json(call, f"tool_calls[{c}]")
            except ValueError as e:
                raise DataError(f"{at}: {e}") from None
            content = turn.get("content") or ""
            if not isinstance(content, str):
                raise DataError(f'{at}: "content" must be a string or null beside tool_calls')
            messages.append({"role": role, "content": content, "tool_calls": calls})
            continue
        messages.append({"role": role, "content": get_str(turn, "content", at, 'a "content" string')})
    return messages


def tools_from_record(obj: dict, where: str | Where) -> list[dict] | None:
    """A record's "tools" field (OpenAI function tools the conversation may call), validated; None if absent."""
    if obj.get("tools") is None:
        return None
    try:
        return check_tools(obj["tools"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def messages_from_record(obj: dict, where: str | Where, system_prompt: str | None) -> list[dict[str, str]]:
    """Normalise any accepted SFT line format to a list of {"role", "content"} messages."""
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        messages = parse_messages(obj[key], where, key)
    elif "instruct" in obj or "instruction" in obj:
        prompt_key, answer_key = ("instruct", "label") if "instruct" in obj else ("instruction", "output")
        expected = f'{{"{prompt_key}": "...", "input": "...", "{answer_key}": "..."}}'
        prompt = get_str(obj, prompt_key, where, expected)
        extra = get_str(obj, "input", where, expected, default="")
        answer = get_str(obj, answer_key, where, expected)
        # Instruction and input are separate paragraphs of one user turn.
        user = f"{prompt}\n{extra}" if prompt and extra else prompt + extra
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": get_str(obj, "system", where, "a string")})
    else:
        raise DataError(
            f'{where}: no "conversations", "messages", "instruct" or "instruction" field; expected '
            f'{_CONV_EXPECTED} or {{"instruct": "...", "input": "...", "label": "..."}}'
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; expected at least one reply to learn from")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class SFTDataset(JsonlExamples):
    """Chat/instruction JSON lines -> (X, Y, loss_mask) with loss only on what the assistant says.

    Accepted lines: {"conversations"|"messages": [{"role", "content"}, ...]} (assistant turns may carry OpenAI
    "tool_calls", "tool" turns the results; a "tools" field lists the functions offered, rendered in the system
    turn), {"instruct", "input", "label"} and {"instruction", "input", "output"} (optional "system" field;
    user turn = instruction + "\\n" + input when both are non-empty). ``system_prompt`` is prepended
    to examples that have no system turn.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, max_length: int = 512,
                 system_prompt: str | None = None) -> None:
        super().__init__(path, tokenizer, max_length)
        self.system_prompt = system_prompt

    def messages(self, i: int) -> list[dict[str, str]]:
        """Example ``i`` as a list of {"role", "content"} messages."""
        return messages_from_record(self.lines.record(i), self.lines.where(i), self.system_prompt)

    def conversation(self, i: int) -> tuple[list[dict[str, str]], list[dict] | None]:
        """Example ``i``'s messages and tools, from one read of its line (DataError naming the line)."""
        record, where = self.lines.record(i), self.lines.where(i)
        return messages_from_record(record, where, self.system_prompt), tools_from_record(record, where)

    def parse(self, i: int) -> list[dict[str, str]]:
        """Example ``i``'s messages, its tools checked too (DataError naming the line)."""
        return self.conversation(i)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        messages, tools = self.conversation(i)
        ids, learn = self.tokenizer.render_conversation(messages, tools=tools)
        # Truncating ids and mask together keeps them aligned; a reply cut off entirely leaves an
        # all-zero mask, so the example adds no loss instead of a wrong one.
        return make_example(ids, learn, self.max_length, self.tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------
# Batching helpers: spend less compute on padding, exactly.


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """The dataset's own identity() when it has one, else its type, length and max_length."""
    if hasattr(dataset, "identity"):
        return dataset.identity()
    return {"kind": type(dataset).__name__, "examples": len(dataset), "max_length": getattr(dataset, "max_length", None)}


def scan_examples(dataset: Dataset) -> tuple[list[int], list[int]]:
    """Per example (one full pass): positions up to and including its last learned label (1 if none), and
    the number of learned labels."""
    lengths, learned = [], []
    for i in range(len(dataset)):
        mask = dataset[i][2]  # [T], or [rows, T] for examples of several sequences (a preference pair)
        positions = mask.reshape(-1, mask.shape[-1]).any(dim=0).nonzero()
        lengths.append(int(positions[-1]) + 1 if len(positions) else 1)
        learned.append(int(mask.count_nonzero()))
    return lengths, learned


def example_lengths(dataset: Dataset) -> list[int]:
    """Per example, the number of positions up to and including its last learned label (one full pass)."""
    return scan_examples(dataset)[0]


def check_learnable(learned: Sequence[int], source: Any, max_length: int | None) -> str | None:
    """DataError when no example has a label to learn; a warning when most examples have none."""
    empty = sum(n == 0 for n in learned)
    within = f" within max_length {max_length}" if max_length else ""
    if sum(learned) == 0:
        raise DataError(f"{source}: none of the {len(learned):,} examples has a token to learn{within} (empty "
                        "texts, or SFT answers all cut off by max_length); training would learn nothing")
    if empty > len(learned) / 2:
        return (f"warning: {empty:,} of {len(learned):,} examples ({100 * empty / len(learned):.0f}%) have no token "
                f"to learn{within} and add nothing to training")
    return None


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int, window_batches: int = 64,
                    seed: int = 0) -> list[int]:
    """Reorder `order` so each batch holds examples of similar length, keeping the shuffle's randomness.

    Windows of `window_batches` batches are sorted by length and cut into batches; the batches of a window
    are then shuffled (seeded), so consecutive steps don't go from short to long. Deterministic for a seed.
    """
    g = torch.Generator().manual_seed(seed)
    window = batch_size * window_batches
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches = [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        for k in torch.randperm(len(full), generator=g).tolist():
            out.extend(full[k])
        out.extend(i for b in batches if len(b) < batch_size for i in b)
    return out


def trim_padding(x_BT: torch.Tensor, y_BT: torch.Tensor, mask_BT: torch.Tensor, *rest: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """Drop trailing columns that no row learns from; exact, as causal attention never looks ahead.

    X, Y and the mask may carry more leading dimensions ([B, 2, T] for preference pairs); `rest` (per-example
    values such as reference log-probs) passes through unchanged.
    """
    learned = mask_BT.reshape(-1, mask_BT.shape[-1]).any(dim=0).nonzero()
    n = int(learned[-1]) + 1 if len(learned) else 1
    return (x_BT[..., :n], y_BT[..., :n], mask_BT[..., :n], *rest)


# ---------------------------------------------------------------------------------------------
# Vocabulary guards: catch ids the embedding table cannot hold before the forward pass.


def check_vocab(source: Any, model_vocab_size: int) -> None:
    """Raise ValueError if ``source`` (a tokenizer, a dataset or an int) has more tokens than the model."""
    n = source if isinstance(source, int) else int(source.vocab_size)
    if n > model_vocab_size:
        what = type(source).__name__ if isinstance(source, Dataset) else "tokenizer"
        raise ValueError(
            f"{what} has {n} tokens but the model's vocab_size is {model_vocab_size}; "
            f"ids >= {model_vocab_size} would index past the embedding table. "
            f"Build the model with vocab_size >= {n}."
        )


def check_token_ids(ids: torch.Tensor | np.ndarray, vocab_size: int, name: str = "input_ids") -> None:
    """Raise ValueError naming the first token id outside [0, vocab_size)."""
    t = torch.from_numpy(ids.astype(np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    if t.numel() == 0:
        return
    bad = (t < 0) | (t >= vocab_size)
    if bool(bad.any()):
        pos = tuple(int(p) for p in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} holds token id {int(t[pos])} at position {pos}, outside the model's vocabulary "
            f"[0, {vocab_size}); the data was tokenized with a different or larger tokenizer"
        )
