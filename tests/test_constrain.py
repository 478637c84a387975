"""Constrained decoding (issue 46, item 4): on a tiny random model, sampled output under a schema's grammar always
parses and validates (a property test over many schemas); forced calls name an offered function with arguments
that validate; the server answers response_format and forced calls through the openai client; a schema the
library cannot compile is a 400 naming it."""

from __future__ import annotations

import json

import pytest
import torch

from minillm.data.tokenizer import load_tokenizer
from minillm.infer.tools import split_calls
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
constrain = pytest.importorskip("minillm.infer.constrain")

# Bounded schemas: every one forces an end (strings and arrays have maximum sizes, numbers ranges), so a random
# model's output must finish within the budget; what is tested is that whatever it samples validates.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tone": {"enum": ["平", "仄"]}, "char": {"type": "string", "minLength": 1,
                                                                            "maxLength": 1}},
     "required": ["tone", "char"], "additionalProperties": False},
    {"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                "minItems": 1, "maxItems": 3}}, "required": ["lines"],
     "additionalProperties": False},
    {"type": "object", "properties": {"poem": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 5}, "year": {"type": "integer", "minimum": 600, "maximum": 1300}},
        "required": ["title", "year"], "additionalProperties": False}}, "required": ["poem"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "词"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["kind"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "string", "maxLength": 2}]}},
     "required": ["x"], "additionalProperties": False},
]
TOOLS = [{"type": "function", "function": {"name": "search_poems", "parameters": SCHEMAS[0]}},
         {"type": "function", "function": {"name": "rhyme", "parameters": SCHEMAS[2]}}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LMConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    return MiniLLM(config).eval()


def sample(model, tok, grammar: str, seed: int, budget: int = 160) -> tuple[list[int], bool]:
    """Sampled ids under the grammar (temperature 1) and whether the grammar let the turn end within the budget."""
    constraint = constrain.Constraint(grammar, tok)
    generator = torch.Generator().manual_seed(seed)
    ids = tok.render_conversation([{"role": "user", "content": "json"}], add_generation_prompt=True)[0]
    out = []
    with torch.inference_mode():
        for _ in range(budget):
            logits = model(torch.tensor([ids + out])).logits[:, -1]
            logits = constraint.mask(logits)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            constraint.advance(token)
            if token == tok.im_end_id:
                return out, True
            out.append(token)
    return out, False


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_sampled_json_always_validates(model, tok, k):
    schema = SCHEMAS[k]
    for seed in range(4):
        ids, ended = sample(model, tok, constrain.json_grammar(schema), seed=100 * k + seed)
        assert ended, tok.decode(ids)
        jsonschema.validate(json.loads(tok.decode(ids)), schema)


def test_forced_calls_name_an_offered_function_with_valid_arguments(model, tok):
    for seed in range(6):
        ids, ended = sample(model, tok, constrain.call_grammar(TOOLS, tok), seed=seed)
        assert ended
        content, (call,) = split_calls(ids, tok)
        assert content == "" and call.name in ("search_poems", "rhyme")
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(call.arguments, schema)
    ids, _ = sample(model, tok, constrain.call_grammar(TOOLS[1:], tok), seed=7)  # a named function: only it
    assert split_calls(ids, tok)[1][0].name == "rhyme"


def test_a_schema_the_library_cannot_compile_is_refused(tok):
    with pytest.raises(constrain.GrammarError):
        constrain.check_grammar(constrain.json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
                                tok)


def test_a_mask_of_the_next_token_only_allows_what_continues_the_grammar(tok):
    constraint = constrain.Constraint(constrain.json_grammar({"enum": ["平", "仄"]}), tok)
    logits = torch.zeros(1, tok.vocab_size)
    allowed = torch.isfinite(constraint.mask(logits))[0].nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]) in ('"', '"平', '"仄', '"平"', '"仄"') for i in allowed)


@pytest.fixture(scope="module")
def client(tiny_sft_dir, tmp_path_factory):
    import shutil

    openai = pytest.importorskip("openai")
    from conftest import LiveServer

    directory = tmp_path_factory.mktemp("tiny1024")  # room for two schemas (see test_serve_tools.py)
    shutil.copytree(tiny_sft_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    with LiveServer(directory) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_server_constrains_forced_calls_and_response_format(client):
    import openai

    question = [{"role": "user", "content": "《春晓》的第一句是什么？"}]
    for choice_ in ("required", {"type": "function", "function": {"name": "rhyme"}}):
        out = client.chat.completions.create(model="tiny", messages=question, tools=TOOLS, tool_choice=choice_,
                                             temperature=0, max_tokens=200)
        assert out.choices[0].finish_reason == "tool_calls"
        (call,) = out.choices[0].message.tool_calls
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.function.name == "rhyme"
    fmt = {"type": "json_schema", "json_schema": {"name": "poem", "schema": SCHEMAS[4]}}
    out = client.chat.completions.create(model="tiny", messages=question, response_format=fmt, temperature=0.7,
                                         seed=1, max_tokens=200, n=3)
    for c in out.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[4])
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/nope"}}}}}
    for body, param in (({"response_format": bad}, "response_format.json_schema.schema"),
                        ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="tiny", messages=question, **body)
        assert raised.value.body["param"] == param
