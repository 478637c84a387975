"""The OpenAI API's tool shapes: `tools` and `tool_choice`, assistant `tool_calls` in the history,
`response_format`, and a reply's calls; each refused with an ApiError naming the field."""

from __future__ import annotations

import json
import uuid

from minillm.data.conversation import check_tools
from minillm.data.tokenizer import Tokenizer
from minillm.infer import constrain
from minillm.infer.api_error import ApiError
from minillm.infer.tools import MalformedCall, split_calls


def parse_tool_calls(calls: object, where: str) -> list[dict]:
    """An assistant message's tool_calls in the history: a non-empty list of calls with ids and JSON arguments."""
    if not isinstance(calls, list) or not calls:
        raise ApiError(400, f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            raise ApiError(400, f"{at} must be {{\"id\": str, \"type\": \"function\", \"function\": "
                                "{\"name\": str, \"arguments\": str}}", at)
        try:
            json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise ApiError(400, f"{at}.function.arguments must be a JSON string", f"{at}.function.arguments") from None
    return calls


def parse_tools(body: dict, tokenizer: Tokenizer) -> tuple[list[dict] | None, str | None]:
    """The validated tools and the function tool_choice forces ("" for "required", None for none forced)."""
    tools, choice_ = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        try:
            check_tools(tools)
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split(" ")[0]) from None
        if not tokenizer.tool_ids and tokenizer.template is None:
            raise ApiError(400, "this model's tokenizer has no tool-call tokens (it was made before tool calling)",
                           "tools")
    names = [t["function"]["name"] for t in tools or []]
    if choice_ is None or choice_ == "auto" or choice_ == "none":
        return tools or None, None
    if not tools:
        raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if choice_ == "required":
        return tools, ""
    name = choice_.get("function", {}).get("name") if isinstance(choice_, dict) and \
        choice_.get("type") == "function" and isinstance(choice_.get("function"), dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise ApiError(400, f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                            f"({', '.join(names)})", "tool_choice")
    return tools, name


def compiled(grammar: str, tokenizer: Tokenizer, param: str) -> str:
    """The grammar, checked now: 400 naming `param` when the library cannot compile it."""
    try:
        constrain.check_grammar(grammar, tokenizer)
    except constrain.GrammarError as e:
        raise ApiError(400, f"the grammar library cannot compile this schema: {e}", param) from None
    return grammar


def parse_response_format(value: object, tokenizer: Tokenizer) -> str | None:
    """response_format: {"type": "text"} (None), {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"?}}, as a grammar."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       "response_format")
    if not constrain.available():
        raise ApiError(400, "'response_format' needs the grammar library on the server: pip install -e "
                            "\".[grammar]\"", "response_format")
    if kind == "json_object":
        return compiled(constrain.json_grammar(None), tokenizer, "response_format")
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                       "response_format.json_schema.schema")
    return compiled(constrain.json_grammar(schema), tokenizer, "response_format.json_schema.schema")


def reply_calls(ids: list[int], tokenizer: Tokenizer, offered: list[str], parallel: bool = True
                ) -> tuple[str, list[dict]] | None:
    """(text before the calls, OpenAI tool_calls) of a reply that calls offered functions; None when it makes no
    call, or a malformed one or one to a function not offered (then the reply is plain text)."""
    try:
        content, calls = split_calls(ids, tokenizer)
    except MalformedCall:
        return None
    if not calls or any(c.name not in offered for c in calls):
        return None
    calls = calls if parallel else calls[:1]
    return content, [c.message("call_" + uuid.uuid4().hex[:24]) for c in calls]
