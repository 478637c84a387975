"""Held-out wordings and vocabulary (issue 45, item 1): what the evaluation asks must be what training never saw."""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections import Counter

import pytest
from conftest import REPO

from minillm.eval.heldout import (
    HELDOUT,
    check_training_side,
    distinct_2,
    document_frequency,
    fixed_text,
    heldout_wording,
    open_words,
    repeats,
)
from minillm.eval.tasks import IMAGERY

NEAR = 0.8  # fixed texts this similar (difflib's ratio) count as the same wording


def training_prompts() -> list[str]:
    """Every user message of sft.jsonl, and every prompt of dpo.jsonl and rl_tools.jsonl (GRPO's prompts)."""
    prompts = []
    for name, key in (("sft.jsonl", "conversations"), ("dpo.jsonl", "prompt"), ("rl_tools.jsonl", "prompt")):
        with open(REPO / "dataset" / name, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                turns = record.get(key) or []
                prompts += [t["content"] for t in turns if isinstance(t, dict) and t.get("role") == "user"]
    return prompts


def as_pattern(template: str) -> re.Pattern:
    """The template as a regex over whole prompts, each field any text."""
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(".+?" if re.fullmatch(r"\{\w+\}", p) else re.escape(p) for p in parts), re.S)


def test_at_least_twenty_wordings_per_kind_all_distinct():
    for kind, wordings in HELDOUT.items():
        assert len(wordings) >= 20, kind
        assert len({fixed_text(w) for w in wordings}) == len(wordings), kind
        fields = {"tune": {"{tune}"}, "form": {"{form}", "{dynasty}"}, "words": {"{w1}", "{w2}", "{kind}"},
                  "quote": {"{title}", "{nth}"}, "tone": {"{char}"}}[kind]
        assert all(fields <= set(re.findall(r"\{\w+\}", w)) for w in wordings), kind
    assert heldout_wording("tune", 0) != heldout_wording("tune", 1) == heldout_wording("tune", 1 + len(HELDOUT["tune"]))


def test_no_heldout_wording_or_a_near_duplicate_is_in_the_training_data():
    """Issue 45: the held-out column means nothing if training saw its wordings. Checked against every user turn
    of sft.jsonl and every prompt of dpo.jsonl (which GRPO samples from), and against build.py's templates."""
    sys.path.insert(0, str(REPO / "dataset"))
    try:
        from build import PROMPT_TEMPLATES
    finally:
        sys.path.pop(0)
    prompts = training_prompts()
    assert len(prompts) > 5000
    for wordings in HELDOUT.values():
        for wording in wordings:
            pattern = as_pattern(wording)
            hits = [p for p in prompts if pattern.fullmatch(p)]
            assert not hits, (wording, hits[:3])
            for _, template in PROMPT_TEMPLATES:
                ratio = difflib.SequenceMatcher(None, fixed_text(wording), fixed_text(template)).ratio()
                assert ratio < NEAR, (wording, template, ratio)
    check_training_side(template for _, template in PROMPT_TEMPLATES)  # what the build checks, passes


@pytest.mark.parametrize("template", [HELDOUT["tune"][3], HELDOUT["words"][5].replace("请据此", "请")])
def test_the_build_refuses_a_training_template_that_is_held_out(template, tmp_path, monkeypatch):
    """Issue 45, bad input: a held-out wording (or a near-duplicate) on the training side, named, before any work."""
    sys.path.insert(0, str(REPO / "dataset"))
    try:
        import build
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(build, "PROMPT_TEMPLATES", [*build.PROMPT_TEMPLATES, ("leak", template)])
    monkeypatch.setattr(build, "fetch_source", lambda *a: pytest.fail("the build went on"))
    with pytest.raises(SystemExit) as raised:
        build.main(["--out", str(tmp_path)])
    assert str(raised.value).startswith("build.py: error: the training template") and repr(template) in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_open_words_come_from_the_poem_and_the_corpus_not_the_training_list():
    frequency = document_frequency(["春风又绿江南岸", "明月何时照我还", "春风得意马蹄疾", "江南好风景旧曾谙",
                                    "落日照大旗", "明月松间照"] * 10)
    pair = open_words(["春风又绿江南岸，明月何时照我还。"], frequency, set(IMAGERY), seed="t", min_documents=10)
    assert pair is not None
    w1, w2 = pair
    assert not {w1, w2} & set(IMAGERY) and not set(w1) & set(w2)
    assert all(w in "春风又绿江南岸明月何时照我还" and frequency[w] >= 10 for w in pair)
    assert open_words(["落日照"], frequency, set(IMAGERY), seed="t", min_documents=10) is None  # 落日, 日照 share 日
    assert open_words(["春风江南"], frequency, set(IMAGERY), seed="t", min_documents=10) is None  # the list's words


@pytest.mark.parametrize("lines, repetitive", [
    (["天涯芳草。", "天涯芳草。"], True),  # the answer issue 45 found after GRPO
    (["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"], False),
    (["春风春风春风春风", "秋月"], True),  # a 4-character phrase three times ("春风春风" at 0, 2, 4)
    (["明月几时有，把酒问青天。", "不知天上宫阙，今夕是何年。"], False),
])
def test_repetition_is_a_repeated_line_or_phrase(lines, repetitive):
    assert repeats(lines) is repetitive


def test_distinct_2_counts_character_bigrams():
    assert distinct_2(["白日依山尽"]) == 1.0
    assert distinct_2(["白白白白"]) == pytest.approx(1 / 3)
    assert distinct_2(["春风", "春风"]) == 0.5


def test_the_build_refuses_a_wordings_file_or_word_list_that_holds_a_heldout_item(tmp_path, monkeypatch):
    """Issue 45, bad input: a composed wording near a held-out one stops the build before any work, naming it;
    a word list that holds a word the held-out evaluation asks for is refused, naming the word."""
    sys.path.insert(0, str(REPO / "dataset"))
    try:
        import build
        from wordings import Vocabulary, load_wordings
    finally:
        sys.path.pop(0)
    spec = json.loads((REPO / "dataset" / "wordings.json").read_text(encoding="utf-8"))
    spec["form"]["frames"].append([[HELDOUT["form"][4]]])  # one held-out wording, verbatim
    bad = tmp_path / "wordings.json"
    bad.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setattr(build, "fetch_source", lambda *a: pytest.fail("the build went on"))
    with pytest.raises(SystemExit) as raised:
        build.main(["--out", str(out), "--wordings", str(bad)])
    assert str(raised.value).startswith(f"build.py: error: {bad}: the training template")
    assert repr(HELDOUT["form"][4]) in str(raised.value) and not out.exists()
    spec["form"]["frames"][-1] = [["{form}"], ["，要有{dynasty}人的味道。"]]  # composed from parts: the same wording
    bad.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="作一首"):
        load_wordings(bad)
    spec["form"]["frames"][-1] = [["写{form}"], ["{w1}"]]  # a field another kind fills
    bad.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"the form wording '写\{form\}\{w1\}' must hold the fields"):
        load_wordings(bad)
    # The shipped file composes hundreds of wordings per kind, every one clear of the held-out ones.
    shipped = load_wordings(REPO / "dataset" / "wordings.json")
    assert {k: len(v) for k, v in shipped.items()} == {"tune": 4800, "tune_open": 480, "form": 423, "words": 1580,
                                                        "word_line": 896, "tool_quote": 285, "tool_source": 102,
                                                        "tool_tone": 102, "tool_chain": 64}
    with pytest.raises(ValueError, match="the word list holds '不知'"):
        Vocabulary(Counter(), {"不知", "人间"}, listed=["明月", "不知"])
    vocab = Vocabulary(Counter({"明月": 30, "不知": 40, "月明": 5, "花花": 50}), {"不知"})
    assert vocab.words == {"明月"}  # frequent enough, two distinct characters, not held out
    assert vocab.words_in("明月几时有，明月") == ["明月"]
