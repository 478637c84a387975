"""The shipped corpus: files parse, match the advertised counts, splits are disjoint, SFT is well formed."""

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

DATASET = Path(__file__).resolve().parent.parent / "dataset"


def _load_build():
    """dataset/build.py as a module (its opencc import is lazy, so this needs no build-time tools)."""
    spec = importlib.util.spec_from_file_location("dataset_build", DATASET / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _read_jsonl(name: str) -> list[dict]:
    with (DATASET / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((DATASET / "stats.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pretrain() -> list[str]:
    records = _read_jsonl("pretrain.jsonl")
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in records)
    return [r["text"] for r in records]


@pytest.fixture(scope="module")
def evals() -> list[str]:
    records = _read_jsonl("eval.jsonl")
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in records)
    return [r["text"] for r in records]


@pytest.fixture(scope="module")
def sft_records() -> list[dict]:
    return _read_jsonl("sft.jsonl")


@pytest.fixture(scope="module")
def sft(sft_records) -> list[list[dict]]:
    """The chats without tools."""
    return [r["conversations"] for r in sft_records if "tools" not in r]


@pytest.fixture(scope="module")
def tool_chats(sft_records) -> list[dict]:
    """The chats that offer the tools (issue 46)."""
    return [r for r in sft_records if "tools" in r]


@pytest.fixture(scope="module")
def heldout(pretrain, evals) -> set[str]:
    """The words the held-out evaluation can ask for (eval_tasks.py computes them the same way)."""
    from minillm.eval.heldout import document_frequency
    from minillm.eval.tasks import heldout_words, parse_poem
    return heldout_words([parse_poem(t) for t in evals], document_frequency(pretrain))


def _body(text: str) -> str:
    """Poem body of a rendered record: everything after the title and attribution lines."""
    return "\n".join(text.split("\n")[2:])


def test_counts_match_stats_and_readme(stats, pretrain, evals, sft_records):
    readme = (DATASET / "README.md").read_text(encoding="utf-8")
    texts = {"pretrain.jsonl": pretrain, "eval.jsonl": evals}
    for name, info in stats["files"].items():
        path = DATASET / name
        assert path.stat().st_size == info["bytes"], name
        if name == "sft.jsonl":
            assert len(sft_records) == info["records"]
            assert sum(len(m["content"]) for r in sft_records for m in r["conversations"]) == info["characters"]
        elif name == "dpo.jsonl":
            pairs = _read_jsonl(name)
            assert len(pairs) == info["records"]
            assert sum(len(m["content"]) for r in pairs for k in ("prompt", "chosen", "rejected")
                       for m in r[k]) == info["characters"]
        elif name == "rl_tools.jsonl":
            lines = _read_jsonl(name)
            assert len(lines) == info["records"] == sum(stats["rl_tools_kinds"].values())
            assert sum(len(m["content"]) for r in lines for m in r["prompt"]) == info["characters"]
        else:
            assert len(texts[name]) == info["records"]
            assert sum(map(len, texts[name])) == info["characters"]
        # The README advertises the same numbers (thousands separated).
        assert f"{info['records']:,}" in readme, f"README lacks the record count of {name}"
        assert f"{info['characters']:,}" in readme, f"README lacks the character count of {name}"


def test_sizes_and_volume(stats, pretrain):
    shipped = ["pretrain.jsonl", "eval.jsonl", "sft.jsonl", "dpo.jsonl", "rl_tools.jsonl", "stats.json", "README.md",
               "build.py"]
    total = sum((DATASET / name).stat().st_size for name in shipped)
    assert total < 40 * 2**20
    assert sum(map(len, pretrain)) >= 2_000_000
    assert stats["source"] == "chinese-poetry@2.0.1"


def test_records_are_whole_simplified_poems(pretrain, evals):
    header = re.compile(r"[^\s（）]+（[^（）]+）|诗经·\S+")
    for text in pretrain + evals:
        lines = text.split("\n")
        assert len(lines) >= 3 and lines[0].strip() == lines[0] != "", text
        assert header.fullmatch(lines[1]), lines[1]
        assert all(lines[2:]), text  # no blank verse lines
    # Traditional-only forms of very common characters must all have been converted.
    traditional = set("們這說對時會為國學開關門馬見長東風雲書無歸聲處愛頭將")
    assert not traditional & set("".join(pretrain + evals))


def test_no_duplicates_and_disjoint_stable_split(pretrain, evals):
    train_keys = [build.text_key(_body(t)) for t in pretrain]
    eval_keys = [build.text_key(_body(t)) for t in evals]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    assert not set(train_keys) & set(eval_keys)
    assert not set(pretrain) & set(evals)
    # The split is the stable hash rule, record by record, and about 1%.
    assert all(build.is_eval_key(k) for k in eval_keys)
    assert not any(build.is_eval_key(k) for k in train_keys)
    assert 0.005 < len(evals) / (len(evals) + len(pretrain)) < 0.02


# What a field can hold, where it is narrower than any text: a bare field of a composed wording would otherwise
# match other patterns' prompts ("请来一首{form}" is a prefix of a words request).
_FIELD_TEXT = {"form": "[五七]言(?:绝句|律诗)", "dynasty": "[\u4e00-\u9fff]{1,2}", "kind": "[诗词曲辞]",
               "w": "[^\\s“”「」‘’\"]{2}", "w1": "[^\\s“”「」‘’\"]{2}", "w2": "[^\\s“”「」‘’\"]{2}",
               "char": "[\u3400-\u9fff]", "nth": "[一二三四]"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELD_TEXT.get(p, '.+?')})"
                      for i, p in enumerate(parts))
    return re.compile(pattern, re.S)


class _Wordings:
    """Every wording a pattern's prompts take: its template, and for the patterns asked in composed wordings
    (`varied`: pattern -> (kind, canonical share)) every wording build.py composes; matched by literal prefix."""

    def __init__(self, names, varied: dict) -> None:
        composed = build.load_wordings(DATASET / "wordings.json")
        self.by_prefix: dict[str, list[tuple[str, str]]] = {}
        for name, template in build.PROMPT_TEMPLATES:
            if name in names:
                for wording in [template, *(composed[varied[name][0]] if name in varied else [])]:
                    self.by_prefix.setdefault(wording.split("{", 1)[0], []).append((name, wording))
        self.compiled: dict[str, re.Pattern] = {}

    def match(self, prompt: str) -> dict[str, re.Match]:
        """The patterns whose wordings match the prompt, each with the match of shortest fields (a bare field
        also matches a quoted value, quotes included)."""
        found: dict[str, re.Match] = {}
        longest = max(map(len, self.by_prefix))
        for k in range(min(longest, len(prompt)) + 1):  # every prefix of the prompt that some wording has
            for name, wording in self.by_prefix.get(prompt[:k], []):
                if wording not in self.compiled:
                    self.compiled[wording] = _template_regex(wording)
                if (m := self.compiled[wording].fullmatch(prompt)) and (
                        name not in found or sum(map(len, m.groups())) < sum(map(len, found[name].groups()))):
                    found[name] = m
        return found


def _bodies_by_title(pretrain: list[str]) -> dict[str, list[str]]:
    """The training poems' bodies under each title."""
    out: dict[str, list[str]] = {}
    for text in pretrain:
        out.setdefault(text.split("\n", 1)[0], []).append(_body(text))
    return out


def _is_excerpt(answer: str, bodies_by_title: dict[str, list[str]]) -> bool:
    """The answer is a title line, then whole consecutive lines of a training poem of that title."""
    title, excerpt = answer.split("\n", 1)
    return any(f"\n{excerpt}\n" in f"\n{body}\n" for body in bodies_by_title.get(title, []))


def test_sft_shape_patterns_and_sources(stats, sft, pretrain, evals, heldout):
    assert len(sft) >= 5000
    wordings = _Wordings({name for name, _ in build.PROMPT_TEMPLATES}, build.VARIED)
    train_keys = {build.text_key(_body(t)) for t in pretrain}
    eval_keys = {build.text_key(_body(t)) for t in evals}
    bodies_by_title = _bodies_by_title(pretrain)
    train_lines = {line for t in pretrain for line in _body(t).split("\n")}
    used, forms, words_asked = Counter(), {}, set()
    for conv in sft:
        assert [m["role"] for m in conv] == ["user", "assistant"]
        prompt, answer = conv[0]["content"], conv[1]["content"]
        assert prompt and answer
        matches = wordings.match(prompt)
        assert len(matches) == 1, f"prompt matches {len(matches)} patterns: {prompt!r}"
        [(name, match)] = matches.items()
        used[name] += 1
        forms.setdefault(name, set()).add(match.re.pattern)
        asked_for = {match.groupdict().get(k) for k in ("w", "w1", "w2")} - {None}
        words_asked |= asked_for
        assert not asked_for & heldout, (prompt, asked_for & heldout)  # issue 45: held-out words stay held out
        # Rebuild the answer's whole poem body and find it among the training poems (never eval).
        lines = answer.split("\n")
        layout = build.ANSWER_LAYOUT[name]
        if layout == "excerpt":  # consecutive lines of a training poem, under its title
            assert _is_excerpt(answer, bodies_by_title), f"not an excerpt of a training poem: {answer[:60]!r}"
            if name == "words":  # a line that opens with the first word, then one that opens with the second
                assert len(lines) == 3 and lines[1].startswith(match["w1"]) and lines[2].startswith(match["w2"])
            else:  # tune_open: the poem's title, which opens with its tune, and its first line
                assert lines[0].startswith(match["tune"]) and len(lines) == 2, answer
            continue
        if layout == "line":
            assert answer in train_lines and answer.startswith(match["w"]), answer
            continue
        if layout == "full":
            body = lines[2:]
        elif layout == "titled":
            body = lines[1:]
        else:
            body = match.group("head").split("\n") + lines
        key = build.text_key("\n".join(body))
        assert key in train_keys, f"SFT answer is not a training poem: {answer[:60]!r}"
        assert key not in eval_keys
    assert dict(used) == {k: v for k, v in stats["sft_patterns"].items() if v and not k.startswith("tool_")}
    assert len(used) >= 10 and min(used.values()) >= 100
    # Issue 45: hundreds of surface forms per varied kind, and open vocabulary beyond the IMAGERY list.
    assert {name: len(forms[name]) for name in build.VARIED} == pytest.approx(
        {"tune_write": 700, "tune_open": 300, "form": 300, "words": 1100, "word_line": 880}, rel=0.3)
    assert len(words_asked - set(build.IMAGERY)) >= 2000  # the corpus's words, not a 46-word list
    assert len(heldout) >= 400 and stats["vocabulary"]["held_out"] == len(heldout)


def test_dpo_pairs_pass_and_fail_the_checks_eval_tasks_uses(stats, sft, pretrain, evals, heldout):
    """Every chosen reply passes the request's check (eval/tasks.py), every rejected one fails it; all replies
    are training poems (rejected: the same poem retitled or with the words swapped, or another training poem);
    no prompt + reply is an SFT example."""
    wordings = _Wordings(set(build.DPO_QUOTA), build.DPO_VARIED)
    train_keys = {build.text_key(_body(t)) for t in pretrain}
    eval_keys = {build.text_key(_body(t)) for t in evals}
    in_sft = {(c[0]["content"], c[1]["content"]) for c in sft}
    bodies_by_title = _bodies_by_title(pretrain)
    used = Counter()
    for pair in _read_jsonl("dpo.jsonl"):
        prompt, chosen, rejected = (pair[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
        assert [len(pair[k]) for k in ("prompt", "chosen", "rejected")] == [1, 1, 1]
        [(name, m)] = wordings.match(prompt).items()
        used[name] += 1
        assert pair["request"] == build.request_fields(name, m.groupdict())  # what GRPO's rewards read
        assert not {pair["request"].get("w1"), pair["request"].get("w2")} & heldout
        check = build.request_check(name, m.groupdict())
        assert check(chosen) and not check(rejected), pair
        assert (prompt, chosen) not in in_sft
        if name == "words":
            assert _is_excerpt(chosen, bodies_by_title), chosen
        else:
            key = build.text_key(chosen.split("\n", 1)[1])
            assert key in train_keys and key not in eval_keys
        if name == "form":
            assert build.text_key(rejected.split("\n", 1)[1]) in train_keys
        else:  # a minimal contrast: the same poem, only the title or the two words differ
            assert len(rejected) == len(chosen) or name == "tune_fill"
            assert rejected.split("\n", 1)[name == "tune_fill"] == chosen.split("\n", 1)[name == "tune_fill"]
    assert dict(used) == stats["dpo_patterns"] == build.DPO_QUOTA


def test_tool_chats_call_the_tools_with_their_real_results_about_training_poems(stats, tool_chats, pretrain, evals):
    """Issue 46, item 2: every tool chat offers the two tools, asks in a tool wording about a training poem (never
    a held-out title), calls with arguments its schema takes, carries what the tool really returns, and answers
    from it (the quoted clause, the source, the tone); writing requests offered the tools answer without a call."""
    pytest.importorskip("pypinyin")
    import tool_chats as chats_module  # dataset/ is on the path once build.py is loaded

    from minillm.data.poems import clauses, parse_poem
    from minillm.eval.tool_tasks import TOOL_TEMPLATES
    from minillm.infer.poem_tools import PoemIndex, poem_tools
    from minillm.infer.tools import Call, check_arguments, run_call

    index = PoemIndex([parse_poem(t) for t in pretrain + evals])
    tools = poem_tools(index)
    schemas = [t.schema() for t in tools.values()]
    composed = build.load_wordings(DATASET / "wordings.json")
    patterns = {kind: [_template_regex(w) for w in [TOOL_TEMPLATES[kind], *composed[kind]]] for kind in TOOL_TEMPLATES}
    heldout_titles = {t.split("\n", 1)[0] for t in evals}
    used = Counter()
    for k, record in enumerate(tool_chats):
        assert record["tools"] == schemas
        conv = record["conversations"]
        prompt, answer = conv[0]["content"], conv[-1]["content"]
        if len(conv) == 2:  # a writing request: no call
            used["tool_none"] += 1
            assert "tool_calls" not in conv[1]
            continue
        kinds = [kind for kind, regexes in patterns.items() if any(r.fullmatch(prompt) for r in regexes)]
        assert len(kinds) == 1, prompt
        used[kinds[0]] += 1
        calls = [m for m in conv if m.get("tool_calls")]
        results = [m for m in conv if m["role"] == "tool"]
        assert len(calls) == len(results) == (2 if kinds[0] == "tool_chain" else 1)
        for call_turn, result in zip(calls, results):
            (call,) = call_turn["tool_calls"]
            assert result["tool_call_id"] == call["id"]
            made = Call(call["function"]["name"], json.loads(call["function"]["arguments"]))
            assert check_arguments(made.arguments, tools[made.name].parameters) is None
            if k % 10 == 0:  # the tool really says this (a sample: the search scans the corpus)
                assert run_call(made, tools) == result["content"]
        if kinds[0] in ("tool_quote", "tool_chain"):
            title = json.loads(calls[0]["tool_calls"][0]["function"]["arguments"])["query"]
            assert title not in heldout_titles and index.count(title) == 1
            (poem,) = index.find(title)
            quoted = re.search("“(.+?)”", answer).group(1)
            assert quoted in clauses("\n".join(poem.lines))[:4] and quoted in results[0]["content"]
        elif kinds[0] == "tool_tone":
            assert chats_module.answer_tone(results[0]["content"]) == answer
        else:
            assert re.search("《(.+)》", answer).group(1) in results[0]["content"].split("\n")[0]
    assert dict(used) == {k: v for k, v in stats["sft_patterns"].items() if k.startswith("tool_")}
    assert dict(used) == chats_module.TOOL_QUOTA
