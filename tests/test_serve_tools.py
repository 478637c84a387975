"""serve.py with tools (issue 46): the OpenAI shapes through the official openai client. The tiny model was not
trained to call, so the scheduler's pick follows a script after the tokens tool_choice forces: what is tested is
the server (forced opening, calls read from ids, tool_calls in whole replies and in streams, bad input)."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch
from conftest import LiveServer

from minillm.infer.serving import GenerationRequest, Sampling

SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "q": {"type": "string"}}}}}
RHYME = {"type": "function", "function": {"name": "rhyme", "parameters": {"type": "object", "properties": {
    "t": {"type": "string"}}}}}
QUESTION = [{"role": "user", "content": "《春晓》的第一句是什么？"}]


@pytest.fixture(scope="module")
def live(tiny_sft_dir, tmp_path_factory):
    # The tiny model's 256 positions hardly hold two schemas (one token per ASCII character); its copy reads 1024
    # (RoPE is computed from the config; the script below writes the replies anyway).
    model = tmp_path_factory.mktemp("tiny1024")
    shutil.copytree(tiny_sft_dir, model, dirs_exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    with LiveServer(model) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def script(live, monkeypatch):
    """Set the text every choice writes after its forced tokens (then <|im_end|>)."""
    text: list[str] = [""]

    def pick(self, logits_1V):
        self.picked += 1
        if self.picked <= len(self.forced):
            return self.forced[self.picked - 1]
        ids = live.tokenizer.encode(text[0], allow_special=True)
        k = self.picked - len(self.forced) - 1
        return ids[k] if k < len(ids) else live.tokenizer.im_end_id

    monkeypatch.setattr(GenerationRequest, "pick", pick)
    return lambda value: text.__setitem__(0, value)


def test_a_call_comes_back_as_tool_calls_whole_and_streamed(client, script):
    script('<tool_call>\n{"name": "search", "arguments": {"q": "春晓"}}\n</tool_call>')
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[SEARCH, RHYME], temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "search"
    assert json.loads(call.function.arguments) == {"q": "春晓"}
    # Streamed, the client's accumulation of the deltas gives the same call.
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(model="tiny", messages=QUESTION, tools=[SEARCH], stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content  # a call is never streamed as text
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert [c["name"] for c in calls.values()] == ["search"] and reasons[-1] == "tool_calls"
    assert json.loads(calls[0]["arguments"]) == {"q": "春晓"}
    # The client runs the tool and sends the result back; the answer is plain content.
    script("春眠不觉晓。")
    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "《春晓》孟浩然\n春眠不觉晓，处处闻啼鸟。"}]
    final = client.chat.completions.create(model="tiny", messages=history, tools=[SEARCH])
    assert final.choices[0].message.content == "春眠不觉晓。" and final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None


def test_text_before_calls_parallel_calls_and_parallel_off(client, script):
    two = ('我来查。\n<tool_call>\n{"name": "rhyme", "arguments": {"t": "晓"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "rhyme", "arguments": {"t": "鸟"}}\n</tool_call>')
    script(two)
    out = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[RHYME])
    message = out.choices[0].message
    assert message.content == "我来查。" and [json.loads(c.function.arguments)["t"] for c in message.tool_calls] \
        == ["晓", "鸟"]
    assert len({c.id for c in message.tool_calls}) == 2
    one = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[RHYME], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_without_the_grammar_library_forced_calls_open_with_the_marker_and_the_named_function(client, script,
                                                                                                 monkeypatch):
    """tests/test_constrain.py checks forced calls under the grammar; without llguidance they are forced openings."""
    from minillm.infer import constrain

    monkeypatch.setattr(constrain, "available", lambda: False)
    script('{"q": "春晓"}}\n</tool_call>')  # what follows the forced opening
    named = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[SEARCH, RHYME],
                                           tool_choice={"type": "function", "function": {"name": "search"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"q": "春晓"}
    script('\n{"name": "rhyme", "arguments": {"t": "晓"}}\n</tool_call>')
    required = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[SEARCH, RHYME],
                                              tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "rhyme"


def test_a_malformed_or_unoffered_call_is_plain_content(client, script):
    for text in ['<tool_call>\n{"name": "search", "arguments": {"q": ',
                 '<tool_call>\n{"name": "delete_files", "arguments": {}}\n</tool_call>']:
        script(text)
        out = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[SEARCH])
        assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
        assert out.choices[0].message.content == text


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [SEARCH, SEARCH]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [SEARCH], "tool_choice": {"type": "function", "function": {"name": "rhyme"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [SEARCH], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": QUESTION + [{"role": "tool", "tool_call_id": "call_x", "content": "r"}]}, "messages[1].tool_call_id"),
    ({"messages": QUESTION + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                     "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_input_is_a_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**{"model": "tiny", "messages": QUESTION, **body})
    assert raised.value.body["param"] == param, raised.value.body


def test_forced_ids_come_first_and_banned_ids_never():
    request = GenerationRequest([1, 2], 8, Sampling(0.0), [0], lambda token: None, forced=[7, 8], banned=[5])
    logits = torch.zeros(1, 10)
    logits[0, 5] = 10.0
    assert [request.pick(logits) for _ in range(3)] == [7, 8, 0]  # then the best id that is not banned
