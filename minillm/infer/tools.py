"""Tools a model may call: a JSON schema each (OpenAI's function shape), the calls read out of a reply, and a call
run bounded in time with its output cut to a budget. What a failing call says goes back to the model as its result.

A reply's calls are found by token id, not by text: only the control tokens <tool_call> ... </tool_call> (which
no user or tool text can produce; minillm/data/conversation.py) open and close a call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from minillm.data.conversation import TOOL_CALL, TOOL_CALL_END
from minillm.data.tokenizer import Tokenizer

CALL_SECONDS = 5.0  # a call that runs longer is abandoned and reported to the model as timed out
RESULT_CHARS = 120  # characters of a result the model sees; the rest is cut (the small model reads 768 tokens)
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, its parameters (a JSON schema of type object)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., str] = field(compare=False)

    def schema(self) -> dict:
        """The tool in OpenAI's shape: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class Call:
    """A call the model wrote: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict

    def message(self, call_id: str) -> dict:
        """The call as an OpenAI tool call (arguments as a JSON string), for the history."""
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


class MalformedCall(ValueError):
    """The reply opened a call it did not close, or wrote one that is not {"name": ..., "arguments": {...}}."""


def split_calls(ids: Sequence[int], tokenizer: Tokenizer) -> tuple[str, list[Call]]:
    """(the reply's text before its first call, its calls) of a reply's ids (end marker excluded).
    MalformedCall when a call is unclosed, is not JSON of that shape, or text follows the calls."""
    tool_ids = tokenizer.tool_ids
    if not tool_ids:
        return tokenizer.decode(ids), []
    open_id, close_id = tool_ids[TOOL_CALL], tool_ids[TOOL_CALL_END]
    ids = list(ids)
    if open_id not in ids:
        if close_id in ids:
            raise MalformedCall(f"{TOOL_CALL_END} without {TOOL_CALL}")
        return tokenizer.decode(ids), []
    start = ids.index(open_id)
    content = tokenizer.decode(ids[:start]).removesuffix("\n")
    calls, pos = [], start
    while pos < len(ids):
        if ids[pos] != open_id:
            if tokenizer.decode(ids[pos:]).strip():
                raise MalformedCall("text after the calls")
            break
        try:
            end = ids.index(close_id, pos + 1)
        except ValueError:
            raise MalformedCall(f"{TOOL_CALL} not closed") from None
        calls.append(parse_call(tokenizer.decode(ids[pos + 1:end])))
        pos = end + 1
        while pos < len(ids) and ids[pos] != open_id and not tokenizer.decode([ids[pos]]).strip():
            pos += 1  # the newline between calls
    return content, calls


def parse_call(text: str) -> Call:
    """A call's JSON {"name": str, "arguments": {...}}; MalformedCall otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedCall(f"the call is not JSON: {e}") from None
    # Exactly the two keys the template writes: a misspelt "arguments" is a broken call, not a call without any.
    if not isinstance(value, dict) or set(value) != {"name", "arguments"} or not isinstance(value["name"], str) \
            or not isinstance(value["arguments"], dict):
        raise MalformedCall('a call must be {"name": string, "arguments": object}')
    return Call(value["name"], value["arguments"])


def check_arguments(arguments: dict, parameters: dict) -> str | None:
    """Why `arguments` do not fit the parameters schema (required keys, known keys, basic types), or None."""
    properties = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    for key, value in arguments.items():
        if key not in properties:
            return f"unknown argument {key!r} (expected one of {', '.join(properties) or 'none'})"
        kind = properties[key].get("type")
        expected = _TYPES.get(kind)
        if expected and (not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool))):
            return f"argument {key!r} must be a {kind}"
    return None


def run_call(call: Call, tools: dict[str, Tool], seconds: float = CALL_SECONDS, max_chars: int = RESULT_CHARS
             ) -> str:
    """The call's result as the model will read it: the tool's text, or what went wrong ("error: ..."), cut to
    max_chars. A call past `seconds` is abandoned (its thread is left to finish on its own) and reported."""
    tool = tools.get(call.name)
    if tool is None:
        return f"error: no tool named {call.name!r} (tools: {', '.join(tools) or 'none'})"
    problem = check_arguments(call.arguments, tool.parameters)
    if problem:
        return f"error: {call.name}: {problem}"
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = str(tool.fn(**call.arguments))
        except Exception as e:  # the tool's failure is the model's information, not the program's end
            box["result"] = f"error: {call.name}: {type(e).__name__}: {e}"

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return f"error: {call.name} took longer than {seconds:g} s"
    result = str(box["result"])
    return result if len(result) <= max_chars else result[:max_chars - 1] + "…"
