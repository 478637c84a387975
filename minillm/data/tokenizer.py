"""Byte-level BPE tokenizer: training, loading, ChatML rendering (ids and loss mask) and saving for transformers.

The one rule for control tokens: text is always encoded as text. A document, a user message or a reply
that contains the string "<|im_end|>" gets the ids of those characters, never the control token; only
`render_conversation` (the chat template) and the data pipeline insert control-token ids.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minillm.data.chat_template import ChatTemplate, cut_at, refuse_control_text
from minillm.data.conversation import CHAT_TEMPLATE, TOOL_TOKENS, pieces, render, uses_tools
from minillm.data.jsonl import iter_texts
from minillm.files import atomic_write, read_json, write_json

# ids 0, 1, 2 in tokenizers trained here; other tokenizers (e.g. Qwen2's) hold them at other ids.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_MAX_LENGTH = 32768
_FIXED_PIECES = ("\n", "assistant\n", "tool\n")

# The template saved by tokenizers made before tool calling (ChatML without tools): still read as minillm's own.
LEGACY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` that has the ChatML special tokens of SPECIAL_TOKENS.

    Their ids are looked up, not assumed: the tokenizers trained here hold them at 0, 1, 2, Qwen2's at
    151643-151645. <|endoftext|> ends documents and pads; <|im_start|>/<|im_end|> frame chat turns; the tool
    tokens (TOOL_TOKENS, after the learned vocabulary) frame calls and results.
    """

    def __init__(self, backend: BackendTokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                 template: ChatTemplate | None = None, eos_token: str | None = None) -> None:
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        missing = [token for token, i in zip(SPECIAL_TOKENS, ids) if i is None]
        self.template = template  # None: ChatML, rendered here
        if missing and template is None:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token and no chat template of its own: "
                             f"minillm needs {', '.join(SPECIAL_TOKENS)} (ChatML, as in its own and Qwen2's "
                             "tokenizers) or a chat_template in tokenizer_config.json / chat_template.jinja")
        self.eos_id, self.im_start_id, self.im_end_id = ids
        if self.eos_id is None:  # an outside tokenizer's end of text (Llama 3: <|end_of_text|>, Gemma: <eos>)
            self.eos_id = backend.token_to_id(eos_token) if eos_token else None
            if self.eos_id is None:
                raise ValueError(f"the tokenizer's eos_token {eos_token!r} is not in its vocabulary")
        self.pad_id = self.eos_id  # padding is never scored, so it needs no token of its own
        self.backend = backend
        # A twin of the backend that encodes special-token strings as ordinary text (the default encode).
        self._plain = BackendTokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.model_max_length = model_max_length
        self._pieces: dict[str, list[int]] = {}  # template pieces ("assistant\n", "\n"), encoded once
        self.source_files: dict[str, str] = {}  # an outside template's configuration files, saved as loaded
        self.extra_end_ids: list[int] = []  # an outside model's generation_config end ids (add_end_ids)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including special tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _backend(self, allow_special: bool) -> BackendTokenizer:
        return self.backend if allow_special else self._plain

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text` as plain text; allow_special=True maps special-token strings to their ids.

        Only a string the program rendered itself (a template) should be encoded with allow_special:
        user text never becomes a control token.
        """
        return self._backend(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); see encode."""
        encodings = self._backend(allow_special).encode_batch(list(texts), add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; exact inverse of `encode` for any string."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None) -> str:
        """Render a conversation (and the tools it may call) as text: the tokenizer's own template, else ChatML
        with tools (minillm/data/conversation.py)."""
        if self.template is not None:
            return self.template.render(messages, add_generation_prompt, tools)
        return render(messages, tools, add_generation_prompt)

    def template_name(self) -> str:
        """Which chat template renders conversations, in words (training logs name it)."""
        if self.template is not None:
            return f"the outside Jinja template of {self.template.origin}"
        return "minillm's ChatML" + (" with tool calls" if self.tool_ids else "") + " (minillm/data/conversation.py)"

    @cached_property
    def tool_ids(self) -> dict[str, int]:
        """The ids of <tool_call>, </tool_call>, <tool_response>, </tool_response>; empty for a tokenizer made
        before tool calling (it renders conversations without tools only)."""
        ids = {token: self.backend.token_to_id(token) for token in TOOL_TOKENS}
        return ids if all(i is not None for i in ids.values()) else {}

    def _piece(self, text: str) -> list[int]:
        if text not in self._pieces:
            self._pieces[text] = self.encode(text)
        return self._pieces[text]

    def render_conversation(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """ChatML ids of `messages` (and `tools`) and a 0/1 mask that is 1 on each assistant turn: its reply, its
        tool calls and its <|im_end|>; never a tool's result (minillm/data/conversation.py has the layout).

        The ids are those of ``encode(apply_chat_template(messages, ...), allow_special=True)`` except that
        message contents, tool schemas and call arguments are always plain text. System and user turns are
        encoded as one piece "{role}\\n{content}"; an assistant turn as "assistant\\n" then its content, so the
        mask boundary is exact and the prompt equals the one generation sees (add_generation_prompt). The one
        divergence from whole-string encoding: a reply starting with two or more whitespace characters,
        which BPE could merge with the header's "\\n"; the split used here is the one the model sees when
        it generates.

        Under an outside template (self.template) the ids are its pieces' (message text as plain text) and the
        mask comes from prefix rendering (all zeros for a generation prompt); see minillm/data/chat_template.py.
        """
        if self.template is not None:
            return self._render_template(messages, add_generation_prompt, tools)
        if uses_tools(messages, tools) and not self.tool_ids:
            raise ValueError("this tokenizer has no <tool_call>/<tool_response> tokens (it was made before tool "
                             "calling): tools need minillm's current tokenizer or a chat template of your own")
        control = {"<|im_start|>": self.im_start_id, "<|im_end|>": self.im_end_id, **self.tool_ids}
        ids: list[int] = []
        learn: list[int] = []
        for piece in pieces(messages, tools, add_generation_prompt):
            if piece.control:
                piece_ids = [control[piece.text]]
            elif piece.text in _FIXED_PIECES:  # the template's own text, encoded once
                piece_ids = self._piece(piece.text)
            else:
                piece_ids = self.encode(piece.text)
            ids += piece_ids
            learn += [int(piece.learned)] * len(piece_ids)
        return ids, learn

    @cached_property
    def special_strings(self) -> list[str]:
        """The control tokens' strings (special added tokens)."""
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    def _render_template(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None
                         ) -> tuple[list[int], list[int]]:
        # A prompt for generation learns nothing, and needs no mask: a template whose history renders differently
        # (refused for multi-turn training) still answers follow-up questions.
        refuse_control_text(messages, tools, self.special_strings)
        parts, spans = self.template.conversation(messages, add_generation_prompt,
                                                  None if add_generation_prompt else self.special_strings, tools)
        ids: list[int] = []
        learn: list[int] = []
        for piece, is_text, start in cut_at(parts, {c for span in spans for c in span}):
            piece_ids = self.encode(piece, allow_special=not is_text)
            ids += piece_ids
            learn += [int(any(a <= start < b for a, b in spans))] * len(piece_ids)
        return ids, learn

    @cached_property
    def _template_turn_ends(self) -> list[int]:
        # The control tokens that close a probe reply's learned span: the template's end marker. Computed on first
        # use, so that a tokenizer only used for plain text never needs jinja2.
        probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        turn = self.template.turn(probe, self.special_strings)
        return [i for i in self.encode(turn, allow_special=True) if self.backend.id_to_token(i) in self.special_strings]

    def check_template(self) -> None:
        """Compile an outside template and render a probe conversation now, so that a broken or hostile template
        fails at load with one TemplateError naming its file (the scripts call this; a library user may not)."""
        if self.template is not None:
            self.template.check()
            _ = self._template_turn_ends

    @property
    def turn_end_ids(self) -> list[int]:
        """The ids that end an assistant turn: <|im_end|> for ChatML, the template's own end markers otherwise."""
        if self.template is None:
            return [self.im_end_id]
        return [*self._template_turn_ends, *self.extra_end_ids]

    def add_end_ids(self, ids: Iterable[int]) -> None:
        """More ids that end a turn under an outside template: its model's generation_config eos_token_id."""
        if self.template is not None:
            self.extra_end_ids = list(dict.fromkeys(i for i in ids if i not in self.turn_end_ids and i != self.eos_id))

    @property
    def stop_ids(self) -> list[int]:
        """Where generation stops: the end of a turn or of the text."""
        return list(dict.fromkeys([self.eos_id, *self.turn_end_ids]))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers (an outside
        tokenizer's own configuration files and template as they were loaded)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        if self.template is not None:
            for name, text in self.source_files.items():
                atomic_write(directory / name, text)
            return
        eos = SPECIAL_TOKENS[0]
        added = {
            str(self.backend.token_to_id(tok)): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for tok in self.control_tokens
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "additional_special_tokens": self.control_tokens[1:],
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": eos,
            "unk_token": eos,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        write_json(directory / "tokenizer_config.json", config)
        special_map = {
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": eos,
            "unk_token": eos,
            "additional_special_tokens": self.control_tokens[1:],
        }
        write_json(directory / "special_tokens_map.json", special_map)

    @property
    def control_tokens(self) -> list[str]:
        """The ChatML tokens, then the tool tokens where the tokenizer has them."""
        return SPECIAL_TOKENS + (TOOL_TOKENS if self.tool_ids else [])

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json)."""
        directory = Path(directory)
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {directory}: expected a directory containing tokenizer.json "
                "(as written by Tokenizer.save_pretrained or `python -m minillm.data.tokenizer`)"
            )
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as err:  # the Rust error names no file, so add it
            raise ValueError(f"{path}: not a valid tokenizers JSON file ({err})") from err
        max_len = DEFAULT_MODEL_MAX_LENGTH
        config_path = path.parent / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        config = config if isinstance(config, dict) else {}
        max_len = config.get("model_max_length", max_len)
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"{config_path}: model_max_length must be a positive integer, got {max_len!r}")
        source = read_chat_template(path.parent)
        if source is None or source in (CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE):
            return cls(backend, model_max_length=max_len)
        special = {name: _token_string(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        origin = path.parent / ("chat_template.jinja" if (path.parent / "chat_template.jinja").is_file()
                                else "tokenizer_config.json")
        tok = cls(backend, max_len, ChatTemplate(source, special, str(origin)), eos_token=special["eos_token"])
        # Saved as they came (the template, its special tokens), not as minillm's ChatML configuration.
        tok.source_files = {name: (path.parent / name).read_text(encoding="utf-8") for name in
                            ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
                            if (path.parent / name).is_file()}
        return tok

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical (compact) tokenizer.json string."""
        return hashlib.sha256(self.backend.to_str(pretty=False).encode("utf-8")).hexdigest()


def _token_string(value: object) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict with its content."""
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(directory: str | Path) -> str | None:
    """The chat template a tokenizer directory declares (chat_template.jinja first, as transformers reads it, then
    tokenizer_config.json's chat_template: a string, or named templates of which "default"); None if none."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = read_json(directory / "tokenizer_config.json").get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def declares_chat_template(directory: str | Path | None) -> bool:
    """Whether a tokenizer directory declares a chat template: in tokenizer_config.json, or in chat_template.jinja
    beside it (transformers' current layout). None is the shipped tokenizer, which does."""
    return read_chat_template(DEFAULT_ASSETS if directory is None else directory) is not None


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer directory; None loads the default shipped in minillm/assets/."""
    return Tokenizer.from_pretrained(DEFAULT_ASSETS if path is None else path)


def iter_jsonl_texts(files: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Yield the `text_key` field of every line of JSONL files (plain .txt files yield whole lines)."""
    for file in files:
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"training file not found: {file}")
        if file.suffix == ".jsonl":
            yield from iter_texts(file, text_key)
            continue
        with file.open(encoding="utf-8") as fh:
            yield from (line.rstrip("\n") for line in fh if line.strip())


def train_tokenizer(
    files: Iterable[str | Path],
    vocab_size: int = 6400,
    min_frequency: int = 2,
    text_key: str = "text",
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on JSONL (`text_key` field) or plain-text files."""
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    backend = BackendTokenizer(models.BPE())
    # add_prefix_space=False keeps encode/decode an exact inverse (no invented leading space).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(iter_jsonl_texts(files, text_key), trainer=trainer)
    # The tool markers come after the learned vocabulary (ids vocab_size ... vocab_size + 3), so a model trained
    # with a tokenizer made before them keeps every id it knows.
    backend.add_special_tokens(TOOL_TOKENS)
    return Tokenizer(backend)


def main(argv: list[str] | None = None) -> None:
    """CLI: train a tokenizer and save it in transformers layout."""
    parser = argparse.ArgumentParser(
        prog="python -m minillm.data.tokenizer",
        description="Train a byte-level BPE tokenizer and save it (tokenizer.json + config files).",
    )
    parser.add_argument("--data", nargs="+", default=["dataset/pretrain.jsonl"],
                        help="training files: JSONL with a text field, or plain text (default: %(default)s)")
    parser.add_argument("--vocab_size", type=int, default=6400,
                        help="vocabulary size including the 3 ChatML tokens; the 4 tool-call tokens are added "
                             "after it (default: %(default)s)")
    parser.add_argument("--min_frequency", type=int, default=2,
                        help="minimum pair count for a merge (default: %(default)s)")
    parser.add_argument("--text_key", default="text", help="JSONL field holding the text (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_ASSETS),
                        help="output directory (default: the shipped minillm/assets)")
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.data, args.vocab_size, args.min_frequency, args.text_key, show_progress=True)
    tok.save_pretrained(args.out)
    print(f"saved tokenizer with {tok.vocab_size} tokens to {args.out} (fingerprint {tok.fingerprint()[:16]})")


if __name__ == "__main__":
    main()
