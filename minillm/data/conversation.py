"""The conversation format: ChatML with tools (the Hermes/Qwen convention), cut into the pieces that are encoded.

One conversation renders the same in three places: as text here (Tokenizer.apply_chat_template), as ids with
the loss mask (Tokenizer.render_conversation, from the same pieces) and in Jinja for transformers
(CHAT_TEMPLATE, tested equal to this file). The layout:

    <|im_start|>system\\n{system text}\\n\\n{TOOLS_HEADER}{one function per line, compact JSON}<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n{text}\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>\\n
    <|im_start|>tool\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n

The markers <tool_call>, </tool_call>, <tool_response>, </tool_response> are control tokens, inserted only
here: message text, tool schemas, call arguments and tool results are encoded as plain text, so none of them
can forge a call or a result. SFT learns each assistant turn (its text, its calls, its <|im_end|>), never a
tool's result.
"""

from __future__ import annotations

import json
from typing import NamedTuple

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOL_TOKENS = [TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END]
# What the system turn says before the schemas (the model reads it; the markers are not spelled in it).
TOOLS_HEADER = "# 工具\n需要时调用下列函数（每行一个 JSON 定义）：\n"
# Each tool's "function" object in compact JSON: a byte-level vocabulary learned on Chinese verse spends a token
# per ASCII character, and the schemas come before every request.


class Piece(NamedTuple):
    """A run of the rendered conversation: control tokens or text, and whether SFT learns it."""

    text: str
    control: bool
    learned: bool


def dumps(value: object) -> str:
    """JSON as the chat template's tojson writes it (transformers: ensure_ascii=False, default separators)."""
    return json.dumps(value, ensure_ascii=False)


def check_tools(tools: object, field: str = "tools") -> list[dict]:
    """OpenAI function tools, validated: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]; ValueError naming the field (tools[1].function.parameters) otherwise."""
    if not isinstance(tools, list):
        raise ValueError(f"{field} must be a list of tools, got {type(tools).__name__}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"{where}.function.name must be a non-empty string of letters, digits, _ and -, "
                             f"got {name!r}")
        if name in names:
            raise ValueError(f"{where}.function.name {name!r} is given twice; tool names must be distinct")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise ValueError(f"{where}.function.description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters must be a JSON schema of type \"object\"")
    return tools


def call_json(call: dict, field: str = "tool_call") -> str:
    """A call as the model writes it: {"name": ..., "arguments": {...}}. `call` is OpenAI's {"type": "function",
    "function": {"name", "arguments"}} (arguments a JSON string, kept verbatim, or an object) or its inner dict."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{field} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": "
                         f"...}}}}, got {call!r}")
    arguments = function.get("arguments", {})
    shown = arguments if isinstance(arguments, str) else dumps(arguments)
    return '{"name": ' + dumps(function["name"]) + ', "arguments": ' + shown + "}"


def check_messages(messages: list[dict], tools: list[dict] | None = None) -> None:
    """Every message has a role and text content (an assistant turn of tool calls may have null content) and the
    tools are OpenAI function tools; ValueError naming the message or field otherwise."""
    for i, m in enumerate(messages):
        _check_message(i, m)
    if tools:
        check_tools(tools)


def _check_message(i: int, m: object) -> None:
    if not isinstance(m, dict) or "role" not in m:
        raise ValueError(f"message {i} must have 'role' and 'content' keys, got {m!r}")
    if m["role"] == "assistant" and m.get("tool_calls"):
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string or null, got {type(m['content']).__name__}")
        if not isinstance(m["tool_calls"], list):
            raise ValueError(f"message {i} tool_calls must be a list")
    elif not isinstance(m.get("content"), str):
        raise ValueError(f"message {i} must have 'role' and 'content' keys, got {m!r}" if "content" not in m
                         else f"message {i} content must be a string, got {type(m['content']).__name__}")


def pieces(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False
           ) -> list[Piece]:
    """The conversation cut into control tokens and text runs, each marked learned or not (see the module doc).

    A system or user turn's "{role}\\n{text}" is one text run and an assistant turn's "assistant\\n" another,
    so that the ids are the ones SFT always trained on, and a generation prompt ends where the reply starts.
    """
    out: list[Piece] = []

    def control(text: str, learned: bool = False) -> None:
        out.append(Piece(text, True, learned))

    def text(value: str, learned: bool = False) -> None:
        if value:
            out.append(Piece(value, False, learned))

    check_messages(messages, tools)
    if tools:
        system = bool(messages) and messages[0]["role"] == "system"
        head = messages[0]["content"] + "\n\n" if system else ""
        schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
        messages = [{"role": "system", "content": head + TOOLS_HEADER + schemas}, *messages[system:]]
    for i, m in enumerate(messages):
        control(IM_START)
        if m["role"] == "assistant":
            text("assistant\n")
            reply = m.get("content") or ""
            text(reply, learned=True)
            for k, call in enumerate(m.get("tool_calls") or []):
                text("\n" if reply or k else "", learned=True)
                control(TOOL_CALL, learned=True)
                text("\n" + call_json(call, f"message {i} tool_calls[{k}]") + "\n", learned=True)
                control(TOOL_CALL_END, learned=True)
            control(IM_END, learned=True)
        elif m["role"] == "tool":
            text("tool\n")
            control(TOOL_RESPONSE)
            text("\n" + m["content"] + "\n")
            control(TOOL_RESPONSE_END)
            control(IM_END)
        else:
            text(f"{m['role']}\n{m['content']}")
            control(IM_END)
        text("\n")
    if add_generation_prompt:
        control(IM_START)
        text("assistant\n")
    return out


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as one string (what CHAT_TEMPLATE renders in transformers)."""
    return "".join(p.text for p in pieces(messages, tools, add_generation_prompt))


def uses_tools(messages: list[dict], tools: list[dict] | None = None) -> bool:
    """Whether rendering needs the tool markers: tools offered, a call made or a result given."""
    return bool(tools) or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                              for m in messages)


# Jinja twin of `render` for transformers (tokenizer_config.json's chat_template); tests render both.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(start=0) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\n\n' -}}{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{{- '" + TOOLS_HEADER.replace("\n", "\\n") + "' -}}"
    "{%- for tool in tools -%}"
    "{{- ('\n' if not loop.first else '') + (tool['function'] | tojson(separators=(',', ':'))) -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set reply = message['content'] or '' -%}"
    "{{- '<|im_start|>assistant\n' + reply -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = f['arguments'] if f['arguments'] is defined else {} -%}"
    "{{- ('\n' if reply or not loop.first else '') + '<tool_call>\n{\"name\": ' + (f['name'] | tojson)"
    " + ', \"arguments\": ' + (args if args is string else args | tojson) + '}\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>tool\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
