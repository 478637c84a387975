"""The OpenAI API's request and response shapes: validating bodies into a `CompletionSpec`, building replies.

No HTTP here (see server.py) and no model: this module turns JSON into token ids and settings, and
results into JSON, with an `ApiError` (status, message, field) for every body it refuses.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from minillm.data.chat_template import TemplateError
from minillm.data.conversation import TOOL_CALL, call_json
from minillm.data.tokenizer import Tokenizer
from minillm.infer import constrain
from minillm.infer.api_error import ApiError
from minillm.infer.generation import MIN_TEMPERATURE
from minillm.infer.openai_tools import compiled, parse_response_format, parse_tool_calls, parse_tools
from minillm.infer.serving import Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_N = 64
MAX_PROMPTS = 64  # prompt strings per /v1/completions request
# Accepted only at the value that means "off", since nothing here implements them.
OFF_VALUES: dict[str, tuple] = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
                                "logprobs": (False,), "echo": (False,), "best_of": (1,)}
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
          "user", "frequency_penalty", "presence_penalty"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "tools", "tool_choice", "parallel_tool_calls",
                        "response_format"}
TEXT_FIELDS = COMMON | {"prompt", "echo", "logprobs", "best_of"}


@dataclass
class CompletionSpec:
    """A validated request: what to generate and how to answer."""

    chat: bool
    """True for /v1/chat/completions, False for /v1/completions."""
    prompts: list[list[int]]
    """Prompt ids: one for chat, one per prompt string for completions."""
    n: int
    """Choices per prompt."""
    max_tokens: int
    """Most tokens per choice."""
    sampling: Sampling
    """Temperature, top_p and the base seed (choice i uses seed + i)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: the text ends before the first one."""
    stream: bool = False
    """Send server-sent events instead of one JSON reply."""
    include_usage: bool = False
    """With stream: a last chunk carrying the token counts."""
    tools: list[str] = field(default_factory=list)
    """The names of the functions offered; a reply's calls to them come back as tool_calls."""
    parallel_tool_calls: bool = True
    """False: at most one call per reply (the first)."""
    forced: list[int] = field(default_factory=list)
    """Ids every choice starts with (tool_choice "required" or a named function: the call's opening)."""
    banned: list[int] = field(default_factory=list)
    """Ids no choice may produce (tool_choice "none": the call marker)."""
    grammar: str | None = None
    """A grammar every choice's output follows (a forced call, response_format), compiled per choice."""

    def choice_sampling(self, i: int) -> Sampling:
        """The sampling of choice i: the request's, with seed + i so that choices differ but repeat."""
        s = self.sampling
        return s if s.seed is None else Sampling(s.temperature, s.top_p, (s.seed + i) % 2**63)


def _get(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__} {value!r:.40}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = _get(body, name, (int, float), "a number")
    if isinstance(value, int) and not -1e300 < value < 1e300:  # a 400-digit integer: float() would overflow
        raise ApiError(400, f"'{name}' must be a finite number in [{lo:g}, {hi:g}], got an integer of "
                            f"{len(str(abs(value)))} digits", name)
    if value is None:
        return default
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, f"'{name}' must be a finite number in [{lo:g}, {hi:g}], got {value!r}", name)
    return float(value)


def _check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in allowed:
            off = sorted(allowed & set(OFF_VALUES))
            raise ApiError(400, f"unsupported parameter '{name}': this server implements "
                                f"{', '.join(sorted(allowed - set(OFF_VALUES)))} (and accepts "
                                f"{', '.join(off)} only at their off values)", name, "unsupported_parameter")
        if name in OFF_VALUES and body[name] is not None and body[name] not in OFF_VALUES[name]:
            raise ApiError(400, f"'{name}' is not supported by this server (only {OFF_VALUES[name][0]!r})",
                           name, "unsupported_parameter")
    return body


def check_model(body: dict, served: str) -> None:
    """404 for a model name other than the one served (a missing name means the served one)."""
    name = _get(body, "model", (str,), "a string")
    if name is not None and name != served:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'", "model",
                       "model_not_found")


def _text(content: object, where: str) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{where}.content parts must be {{\"type\": \"text\", \"text\": str}}; "
                                "this model reads text only", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string, got {type(content).__name__}", f"{where}.content")
    return content


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out: list[dict] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object, got {type(m).__name__}", where)
        extra = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
        if extra:
            raise ApiError(400, f"{where} has unsupported field(s) {', '.join(sorted(extra))}", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = parse_tool_calls(m["tool_calls"], where)
            call_ids |= {c["id"] for c in calls}
            text = "" if m.get("content") is None else _text(m["content"], where)
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
            continue
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in call_ids:
                raise ApiError(400, f"{where}.tool_call_id {call_id!r} answers no tool call of an earlier assistant "
                                    "message", f"{where}.tool_call_id")
        elif "tool_call_id" in m:
            raise ApiError(400, f"{where}.tool_call_id belongs to role 'tool' messages only", f"{where}.tool_call_id")
        out.append({"role": ROLES[role], "content": _text(m.get("content"), where)})
    return out


def _prompt_texts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
    if len(texts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(texts)} strings; this server takes at most {MAX_PROMPTS} per "
                            "request", "prompt")
    return texts


def _prompts(texts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    ids = tokenizer.encode_batch(texts)  # plain text: control-token strings stay text
    for i, p in enumerate(ids):
        if not p:
            raise ApiError(400, f"prompt {i} is empty: there is nothing to continue", "prompt")
    return ids


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops


def _max_tokens(body: dict, prompt_len: int, context: int) -> int:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' disagree; give one", "max_tokens")
    name = next(iter(given), "max_tokens")
    value = _get(body, name, (int,), "an integer")
    if prompt_len >= context:
        raise ApiError(400, f"the prompt is {prompt_len} tokens, but this server's context is {context} "
                            "tokens, which leaves no room for an answer; shorten the prompt",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if value is None:
        return context - prompt_len
    if value < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {value}", name)
    if prompt_len + value > context:
        raise ApiError(400, f"this server's context is {context} tokens, but {prompt_len + value} were "
                            f"requested ({prompt_len} in the prompt, {value} in '{name}'); lower '{name}' to at "
                            f"most {context - prompt_len} or shorten the prompt", name, "context_length_exceeded")
    return value


def _choice_count(body: dict, n_prompts: int, max_sequences: int) -> int:
    """'n', checked with the prompt count against what one request may ask for, before anything is built."""
    n = _get(body, "n", (int,), "an integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {n}", "n")
    if n_prompts * n > max_sequences:
        field = "n" if n > 1 else "prompt"
        raise ApiError(400, f"the request asks for {n_prompts} prompt(s) x n={n} = {n_prompts * n} sequences; this "
                            f"server takes at most {max_sequences} per request (its --max_waiting)", field)
    return n


def parse_request(body: Any, chat: bool, tokenizer: Tokenizer, context: int, served: str,
                  max_sequences: int = MAX_N * MAX_PROMPTS) -> CompletionSpec:
    """Validate a chat (chat=True) or text completion body; ApiError names the first field at fault.

    Sizes are checked before any work: prompts x n may not exceed `max_sequences` (the scheduler's waiting line).
    """
    body = _check_fields(body, CHAT_FIELDS if chat else TEXT_FIELDS)
    check_model(body, served)
    forced: list[int] = []
    banned: list[int] = []
    tools = None
    grammar = None
    if chat:
        messages = _messages(body)
        tools, must_call = parse_tools(body, tokenizer)
        n = _choice_count(body, 1, max_sequences)
        try:  # an outside template renders in a bounded worker (minillm/data/chat_template.py)
            prompts = [tokenizer.render_conversation(messages, add_generation_prompt=True, tools=tools)[0]]
        except TemplateError as e:  # the client's conversation, refused or too costly to render: theirs to fix
            raise ApiError(400, str(e), "messages", "invalid_conversation") from None
        except ValueError as e:  # a tool schema or call spelling a control token under an outside template
            raise ApiError(400, str(e), "tools", "invalid_conversation") from None
        opening = tokenizer.tool_ids.get(TOOL_CALL)
        if must_call is not None and opening is None:
            raise ApiError(400, "'tool_choice' can force a call only under minillm's own chat template", "tool_choice")
        if must_call is not None and constrain.available():  # the call is the grammar's: a valid one, always
            offered = [t for t in tools if t["function"]["name"] == must_call] if must_call else tools
            grammar = compiled(constrain.call_grammar(offered, tokenizer), tokenizer, "tools")
        elif must_call is not None:  # no grammar library: the reply starts with the call's opening at least
            forced = [opening] + (tokenizer.encode("\n" + call_json({"name": must_call}).split(', "arguments"')[0]
                                                   + ', "arguments": ') if must_call else [])
        if body.get("response_format") is not None:
            if grammar is not None:
                raise ApiError(400, "'response_format' cannot be combined with a forced tool call", "response_format")
            grammar = parse_response_format(body["response_format"], tokenizer)
        if body.get("tool_choice") == "none" and opening is not None:
            banned = [opening]
    else:
        texts = _prompt_texts(body)
        n = _choice_count(body, len(texts), max_sequences)
        prompts = _prompts(texts, tokenizer)
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    if temperature < MIN_TEMPERATURE or top_p == 0:
        temperature = 0.0  # both select the most likely token: greedy
    seed = _get(body, "seed", (int,), "an integer")
    stream = bool(_get(body, "stream", (bool,), "true or false"))
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    options = options or {}
    if set(options) - {"include_usage"}:
        raise ApiError(400, f"unsupported stream_options {sorted(set(options) - {'include_usage'})}",
                       "stream_options")
    include_usage = bool(_get(options, "include_usage", (bool,), "true or false"))
    max_tokens = min(_max_tokens(body, len(p), context) for p in prompts)
    parallel = _get(body, "parallel_tool_calls", (bool,), "true or false")
    return CompletionSpec(chat=chat, prompts=prompts, n=n, max_tokens=max_tokens,
                          sampling=Sampling(temperature, top_p if top_p < 1 else None, seed),
                          stop=_stop(body), stream=stream, include_usage=include_usage,
                          tools=[t["function"]["name"] for t in tools or []],
                          parallel_tool_calls=parallel is not False, forced=forced, banned=banned, grammar=grammar)


# --- replies -----------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    """A fresh response id, "chatcmpl-..." or "cmpl-..."."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, index: int, text: str, finish_reason: str | None, delta: bool = False,
           first: bool = False, tool_calls: list[dict] | None = None) -> dict[str, Any]:
    """One entry of "choices": a whole message, a streamed delta, or a text completion's text."""
    out: dict[str, Any] = {"index": index}
    if not chat:
        out["text"] = text
    elif delta:
        out["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) \
            if text or first else {}
        if tool_calls:
            out["delta"]["tool_calls"] = tool_calls
    else:
        out["message"] = {"role": "assistant", "content": text or None if tool_calls else text}
        if tool_calls:
            out["message"]["tool_calls"] = tool_calls
    out["logprobs"] = None
    out["finish_reason"] = finish_reason
    return out


def reply(spec: CompletionSpec, rid: str, model: str, choices: list[dict], usage_: dict | None,
          chunk: bool = False) -> dict[str, Any]:
    """A whole response, or (chunk=True) one streamed chunk."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if spec.chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                           "choices": choices}
    if not chunk or spec.include_usage:
        out["usage"] = usage_
    return out


def model_list(name: str, created: int) -> dict[str, Any]:
    """The body of GET /v1/models."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "minillm"}]}
