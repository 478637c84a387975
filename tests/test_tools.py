"""Tool calling, part 2 (issue 46): the poetry tools, calls read out of reply ids, calls run bounded in time and
size, and the tool loop feeding results back (with a scripted model in place of generation)."""

from __future__ import annotations

import json
import time

import pytest

import minillm.infer.tool_loop as tool_loop
from minillm.data.poems import parse_poem
from minillm.data.tokenizer import load_tokenizer
from minillm.infer.poem_tools import PoemIndex, poem_tools, rhyme
from minillm.infer.tools import Call, MalformedCall, Tool, check_arguments, run_call, split_calls

pytest.importorskip("pypinyin")

POEMS = ["静夜思\n李白（唐）\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
         "春晓\n孟浩然（唐）\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
         "静夜思·其二\n无名氏（宋）\n明月照高楼，流光正徘徊。",
         "月夜\n杜甫（唐）\n今夜鄜州月，闺中只独看。"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tools():
    return poem_tools(PoemIndex([parse_poem(p) for p in POEMS]))


def reply(tok, text: str) -> list[int]:
    """A reply's ids as the model would write them: markers as control tokens, the rest as text."""
    return tok.encode(text, allow_special=True)


def test_search_ranks_exact_title_then_title_part_then_line_then_author(tools):
    search = tools["search_poems"].fn
    assert search("静夜思") == "《静夜思》李白（唐）\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert search("《春晓》").startswith("《春晓》孟浩然")  # quotes around a title are ignored
    assert search("明月").startswith("《静夜思》李白")  # no title is "明月": the first poem holding it
    assert search("杜甫").startswith("《月夜》杜甫")
    assert search("不存在的诗") == "没有找到与“不存在的诗”相关的诗词。"
    index = PoemIndex([parse_poem(p) for p in POEMS])
    assert [p.title for p in index.find("静夜思", 3)] == ["静夜思", "静夜思·其二"]
    assert index.count("静夜思") == 1


def test_rhyme_gives_pinyin_final_tone_and_class():
    assert rhyme("霜") == "霜：shuāng，韵母 uang，第1声，平"
    assert rhyme("月a!") == "月：yuè，韵母 üe，第4声，仄"  # non-Chinese characters are skipped
    assert rhyme("hello") == "没有汉字可查。"


def test_calls_are_read_from_control_tokens_only(tok):
    one = reply(tok, '先查一下。\n<tool_call>\n{"name": "rhyme", "arguments": {"text": "霜"}}\n</tool_call>')
    assert split_calls(one, tok) == ("先查一下。", [Call("rhyme", {"text": "霜"})])
    two = reply(tok, '<tool_call>\n{"name": "rhyme", "arguments": {"text": "霜"}}\n</tool_call>\n'
                     '<tool_call>\n{"name": "search_poems", "arguments": {"query": "春晓"}}\n</tool_call>')
    assert [c.name for c in split_calls(two, tok)[1]] == ["rhyme", "search_poems"]
    # The same characters typed as text are no call at all.
    text = '<tool_call>{"name": "rhyme", "arguments": {}}</tool_call>'
    assert split_calls(tok.encode(text), tok) == (text, [])
    for bad, why in [('<tool_call>\n{"name": "rhyme"', "not closed"), ("<tool_call>\nnot json\n</tool_call>", "JSON"),
                     ('<tool_call>\n["rhyme"]\n</tool_call>', "must be"),
                     ('<tool_call>\n{"name": "rhyme"}\n</tool_call>', "must be"),  # OpenAI's shape has arguments
                     ('<tool_call>\n{"name": "rhyme", "sextents": {"text": "霜"}}\n</tool_call>', "must be"),
                     ('<tool_call>\n{"name": "rhyme", "arguments": {}, "id": 1}\n</tool_call>', "must be"),
                     ('<tool_call>\n{"name": "rhyme", "arguments": {}}\n</tool_call>then more', "text after"),
                     ("oops</tool_call>", "without")]:
        with pytest.raises(MalformedCall, match=why):
            split_calls(reply(tok, bad), tok)


def test_arguments_are_checked_against_the_schema():
    schema = {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["q"]}
    assert check_arguments({"q": "x", "n": 2}, schema) is None
    assert check_arguments({}, schema) == "missing argument 'q'"
    assert check_arguments({"q": "x", "z": 1}, schema) == "unknown argument 'z' (expected one of q, n)"
    assert check_arguments({"q": 3}, schema) == "argument 'q' must be a string"
    assert check_arguments({"q": "x", "n": True}, schema) == "argument 'n' must be a integer"


def test_a_failing_slow_or_verbose_tool_reports_to_the_model(tools):
    def boom(x: str) -> str:
        raise KeyError(x)

    def slow(x: str) -> str:
        time.sleep(2)
        return "late"

    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    mine = {**tools, "boom": Tool("boom", "", schema, boom), "slow": Tool("slow", "", schema, slow),
            "long": Tool("long", "", schema, lambda x: x * 500)}
    assert run_call(Call("boom", {"x": "k"}), mine) == "error: boom: KeyError: 'k'"
    assert run_call(Call("slow", {"x": "k"}), mine, seconds=0.2) == "error: slow took longer than 0.2 s"
    assert run_call(Call("nope", {}), mine).startswith("error: no tool named 'nope' (tools: search_poems, rhyme")
    assert run_call(Call("rhyme", {"char": "霜"}), mine) == "error: rhyme: missing argument 'text'"
    long = run_call(Call("long", {"x": "诗"}), mine, max_chars=50)
    assert len(long) == 50 and long.endswith("…")


def test_the_loop_runs_calls_and_feeds_results_back(tok, tools, monkeypatch):
    script = ['<tool_call>\n{"name": "search_poems", "arguments": {"query": "静夜思"}}\n</tool_call>',
              '<tool_call>\n{"name": "rhyme", "arguments": {"text": "霜"}}\n</tool_call>',
              "第二句是“疑是地上霜”，末字“霜”读 shuāng，平声。"]
    prompts = []

    def scripted(model, tokenizer, prompt, max_new_tokens, temperature=0.0, generator=None, **sampling):
        prompts.append(tokenizer.decode(prompt))
        return reply(tokenizer, script[len(prompts) - 1])

    monkeypatch.setattr(tool_loop, "reply_ids", scripted)
    seen = []
    run = tool_loop.run_with_tools(None, tok, [{"role": "user", "content": "《静夜思》第二句末字是平声吗？"}], tools,
                                   on_call=lambda call, result: seen.append((call.name, result)))
    assert run.answer == script[2] and not run.exhausted
    assert [c.name for c in run.calls] == ["search_poems", "rhyme"] and seen[1] == ("rhyme", rhyme("霜"))
    assert [m["role"] for m in run.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert json.loads(run.messages[0]["tool_calls"][0]["function"]["arguments"]) == {"query": "静夜思"}
    # Every prompt offers the tools; the second holds the search result, the third the rhyme too.
    assert all('"name":"search_poems"' in p for p in prompts)
    assert "<tool_response>\n《静夜思》李白（唐）\n床前明月光" in prompts[1] and rhyme("霜") in prompts[2]


def test_the_loop_stops_calling_after_max_turns_and_keeps_malformed_calls_as_text(tok, tools, monkeypatch):
    call = '<tool_call>\n{"name": "rhyme", "arguments": {"text": "霜"}}\n</tool_call>'
    monkeypatch.setattr(tool_loop, "reply_ids", lambda *a, **k: reply(tok, call))
    run = tool_loop.run_with_tools(None, tok, [{"role": "user", "content": "?"}], tools, max_turns=2)
    assert run.exhausted and len(run.calls) == 2 and run.answer == ""
    monkeypatch.setattr(tool_loop, "reply_ids", lambda *a, **k: reply(tok, "<tool_call>\n{oops"))
    run = tool_loop.run_with_tools(None, tok, [{"role": "user", "content": "?"}], tools)
    assert run.answer == "<tool_call>\n{oops" and run.calls == []


def test_generate_cli_runs_the_loop_and_refuses_bad_tool_flags(tiny_sft_dir, tmp_path, capsys, monkeypatch):
    """generate.py --tools: the loop runs (calls to stderr, the answer to stdout); bad flags are one line."""
    import shutil

    from conftest import load_script

    cli = load_script("generate.py")
    model = tmp_path / "tiny"  # the schemas need more than the tiny model's 256 positions
    shutil.copytree(tiny_sft_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    tok = load_tokenizer(model)
    script = iter(['<tool_call>\n{"name": "rhyme", "arguments": {"text": "霜"}}\n</tool_call>', "平声。"])
    monkeypatch.setattr(tool_loop, "reply_ids", lambda *a, **k: reply(tok, next(script)))
    assert cli.main(["--model", str(model), "--tools", "rhyme", "--prompt", "霜？", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == "平声。\n" and f'[rhyme({{"text": "霜"}}) -> {rhyme("霜")}]' in err
    for flags, message in [(["--tools", "nope"], "no tool named 'nope'"),
                           (["--tools", "all", "--raw"], "cannot be combined with --raw"),
                           (["--tools", "all", "--max_tool_turns", "0"], "--max_tool_turns must be >= 1")]:
        assert cli.main(["--model", str(model), "--prompt", "x", *flags]) == 1
        assert message in capsys.readouterr().err


def test_eval_tasks_without_pypinyin_skips_the_tool_tasks_or_says_what_to_install(tiny_sft_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """A plain `pip install -e .` has no pypinyin: eval_tasks.py on a chat model crashed with a traceback in the
    tool tasks (found running README's first-half-hour commands from a fresh clone)."""
    from conftest import load_script

    cli = load_script("eval_tasks.py")
    monkeypatch.setattr(cli, "rhyme_available", lambda: False)
    out = tmp_path / "r.json"
    assert cli.main(["--model", str(tiny_sft_dir), "--limit", "2", "--json", str(out), "--max_new_tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert 'the tool tasks are skipped: the rhyme tool needs pypinyin: pip install -e ".[tools]"' in err
    assert "tools" not in json.loads(out.read_text()) and "requests" in json.loads(out.read_text())
    assert cli.main(["--model", str(tiny_sft_dir), "--tasks", "tools"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks tools: the rhyme tool needs pypinyin" in err and "Traceback" not in err
