"""What training never saw: request wordings, open vocabulary, and the measures of degenerate answers.

The SFT, DPO and GRPO data ask for tunes, forms and words in the wordings of dataset/build.py (its templates and
the wordings it composes from dataset/wordings.json). A model can learn those sentences instead of the requests,
so eval_tasks.py also asks in the wordings below, which no training file holds (tests/test_heldout.py checks every
one, and its near-duplicates, against sft.jsonl, dpo.jsonl and build.py's templates), and for words taken from the
held-out poems' own lines (open_words), which the build leaves out of every training request (eval/tasks.py
heldout_words). dataset/build.py must never use these wordings: they are kept here, apart from it, and the build
refuses a template or a composed wording equal or near to one of them.

Degeneration is measured on every answer: a line written twice, or a 4-character phrase written three times,
makes an answer repetitive; distinct-2 is the share of distinct character bigrams over all answers.
"""

from __future__ import annotations

import difflib
import random
import re
from collections import Counter
from collections.abc import Iterable

# Fields: {tune}; {dynasty} and {form} (五言绝句, 七言律诗, ...); {kind} (诗 or 词), {w1} and {w2}.
HELDOUT_TUNE = [
    "按《{tune}》的格律作一首词吧。", "能不能替我依《{tune}》谱一阕新词？", "词牌选《{tune}》，请你动笔。",
    "我想读一首新填的《{tune}》。", "以{tune}为调，作词一首。", "麻烦用《{tune}》这个调子写首词。",
    "试着依照《{tune}》的句式填一阕。", "请创作一阕《{tune}》。", "给我来一首《{tune}》，要自己写的。",
    "作一首词，调寄《{tune}》。", "《{tune}》——请按这个词牌填词。", "帮忙填一首《{tune}》词，谢谢。",
    "写阕{tune}，题材随意。", "请依{tune}词牌，新作一首。", "你会填《{tune}》吗？填一首看看。",
    "以《{tune}》为牌名，写一首词作。", "就用《{tune}》吧，写一首新词。", "调名：{tune}。请写一首词。",
    "想要一首原创的《{tune}》，请写。", "按照《{tune}》的平仄，为我写一首。", "来阕《{tune}》。",
]
HELDOUT_FORM = [
    "作一首{form}，要有{dynasty}人的味道。", "能写首{form}吗？仿{dynasty}代风格。",
    "体裁：{form}；朝代风格：{dynasty}。请写。", "给我一首{dynasty}风的{form}。",
    "请你吟一首{form}，学{dynasty}人的笔法。", "以{dynasty}代诗人的口吻写{form}一首。",
    "来首{form}，{dynasty}代气象的。", "试作{form}一首，取法{dynasty}人。", "我想看一首{form}，风格近{dynasty}。",
    "写{form}一首，格调仿{dynasty}。", "帮我作首{form}，就像{dynasty}代人写的那样。",
    "请按{form}的体例，成诗一首，{dynasty}代风格。", "{form}一首，要{dynasty}调。",
    "用{form}的格式吟诗，效法{dynasty}人。", "能否创作一首{dynasty}体{form}？",
    "劳驾赋一首{form}，{dynasty}代风格即可。", "作诗：{form}，仿{dynasty}。", "请以{dynasty}人的笔调赋{form}一首。",
    "吟一首新的{form}，有{dynasty}诗的韵味。", "来一首{form}吧，像{dynasty}诗那样。",
    "动笔作首{form}，走{dynasty}人的路子。",
]
HELDOUT_WORDS = [
    "作一首{kind}，{kind}中须出现「{w1}」与「{w2}」。", "请把‘{w1}’和‘{w2}’写进一首{kind}里。",
    "用{w1}、{w2}两个词作首{kind}。", "赋{kind}一首，嵌入“{w1}”“{w2}”二词。",
    "我给你两个词：{w1}，{w2}。请用它们成{kind}一首。", "关键词“{w1}”“{w2}”，请据此作{kind}。",
    "能否吟一首含有{w1}和{w2}的{kind}？", "以『{w1}』『{w2}』入{kind}，作一首。",
    "来首{kind}，里面要有{w1}，也要有{w2}。", "请创作一首{kind}，必须用到“{w1}”及“{w2}”。",
    "{w1}、{w2}——把这两个词放进你的{kind}里。", "帮我作一首{kind}，词语“{w1}”和“{w2}”都不能缺。",
    "作{kind}一首，要求包含{w1}与{w2}。", "试以“{w1}”“{w2}”为字眼，赋一首{kind}。",
    "一首{kind}，请让“{w1}”和“{w2}”都出现。", "用{w1}和{w2}，吟一首短{kind}。",
    "给你“{w1}”“{w2}”，来一首{kind}。", "请赋{kind}，{w1}和{w2}这两个词一个都不能少。",
    "把{w1}跟{w2}嵌进{kind}里吧。", "作一首{kind}，务必出现{w1}、{w2}。", "{kind}一首：须含“{w1}”，须含“{w2}”。",
]
# Tool requests (issue 46): {title} and {nth} (一 ... 四) of a held-out poem; {char}, one character.
HELDOUT_QUOTE = [
    "背一下《{title}》第{nth}句给我听。", "《{title}》这首作品，第{nth}句原文是？", "第{nth}句——《{title}》里写的是什么？",
    "能引用《{title}》的第{nth}句吗？", "我记不清《{title}》第{nth}句了，提醒我一下。", "麻烦给出《{title}》中的第{nth}句原文。",
    "引《{title}》第{nth}句。", "《{title}》开篇往后数第{nth}句，原句是？", "想核对《{title}》第{nth}句的原文。",
    "谁能说出《{title}》第{nth}句？", "请准确写出《{title}》的第{nth}句。", "你知道《{title}》第{nth}句吗？写出来。",
    "《{title}》——第{nth}句的原文。", "给我念念《{title}》第{nth}句。", "《{title}》一诗第{nth}句原文如何？",
    "求《{title}》第{nth}句。", "翻一翻《{title}》，第{nth}句写的什么？", "抄录《{title}》第{nth}句。",
    "《{title}》第{nth}句，原文照录。", "在《{title}》里，第{nth}句原文是哪几个字？", "默写《{title}》的第{nth}句。",
]
HELDOUT_TONE = [
    "{char}这个字读第几声，平还是仄？", "按平仄分，{char}归哪一类？", "写诗时{char}当平声用还是仄声用？",
    "{char}字的平仄如何？", "判断一下“{char}”的平仄。", "“{char}”在普通话里是平声字吗？",
    "作格律诗，“{char}”算平还是算仄？", "给“{char}”标一下平仄。", "{char}：平声？仄声？",
    "“{char}”读起来是平调还是仄调？", "请判定“{char}”字平仄。", "我想知道“{char}”是不是仄声字。",
    "“{char}”在声律上归入哪一类，平或仄？", "说说“{char}”的平仄。", "帮我辨一下“{char}”是平是仄，谢谢。",
    "“{char}”字什么声调？平仄呢？", "{char}的平仄告诉我。", "押韵时要用到“{char}”，它属于平声字吗？",
    "考考你：“{char}”平声仄声？", "“{char}”这个字，平仄怎么分？", "平仄题：{char}。",
]
HELDOUT = {"tune": HELDOUT_TUNE, "form": HELDOUT_FORM, "words": HELDOUT_WORDS, "quote": HELDOUT_QUOTE,
           "tone": HELDOUT_TONE}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_FIELD = re.compile(r"\{\w+\}")


def fixed_text(template: str) -> str:
    """A template's own characters, its fields removed: what two wordings are compared on."""
    return _FIELD.sub("", template)


NEAR_DUPLICATE = 0.8  # difflib ratio of two wordings' fixed texts at or above which they count as one


def check_training_side(templates: Iterable[str]) -> None:
    """ValueError naming the first training template that is a held-out wording or a near-duplicate of one
    (dataset/build.py calls this before it reads the corpus). Held-out words are checked by the build itself
    (dataset/wordings.py Vocabulary)."""
    matchers = [(held, difflib.SequenceMatcher(None, "", fixed_text(held))) for held in sum(HELDOUT.values(), [])]
    for template in templates:
        for held, matcher in matchers:  # the held-out side's index is built once; the quick bounds skip most pairs
            matcher.set_seq1(fixed_text(template))
            if matcher.real_quick_ratio() >= NEAR_DUPLICATE and matcher.quick_ratio() >= NEAR_DUPLICATE and (
                    ratio := matcher.ratio()) >= NEAR_DUPLICATE:
                raise ValueError(f"the training template {template!r} is the held-out wording {held!r} (or too "
                                 f"close to it: similarity {ratio:.2f}); held-out wordings are for evaluation only "
                                 "(minillm/eval/heldout.py)")


def heldout_wording(kind: str, i: int) -> str:
    """The i-th held-out wording of a request kind (cycled), so that consecutive requests vary their wording."""
    wordings = HELDOUT[kind]
    return wordings[i % len(wordings)]


def clause_pairs(text: str) -> list[str]:
    """Every 2-character string inside a run of Chinese characters of `text`, in order (never across punctuation
    or a line break): the candidate words of the corpus statistics, the evaluation and the build."""
    return [clause[i:i + 2] for clause in re.split(r"[^\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+", text)
            for i in range(len(clause) - 1)]


def document_frequency(texts: Iterable[str]) -> Counter:
    """In how many texts each 2-character Chinese string occurs: corpus statistics that tell words from chance."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(set(clause_pairs(text)))
    return counts


def open_words(lines: list[str], frequency: Counter, exclude: set[str], seed: str, min_documents: int = 20
               ) -> tuple[str, str] | None:
    """Two words of a held-out poem's own lines: 2-character strings of one clause that at least min_documents
    training texts hold (so they are words of the language, not chance pairs), none in `exclude` (the training
    list), two distinct characters each; drawn deterministically from `seed`. None when fewer than two."""
    found = [w for w in dict.fromkeys(clause_pairs("".join(lines)))
             if w[0] != w[1] and w not in exclude and frequency[w] >= min_documents]
    rng = random.Random(seed)
    for w1 in rng.sample(found, len(found)):
        others = [w for w in found if not set(w) & set(w1)]  # two words that share no character
        if others:
            return w1, rng.choice(others)
    return None


def repeats(answer_lines: list[str]) -> bool:
    """An answer is repetitive when a line occurs twice, or a 4-character phrase of its text three times."""
    lines = [line.strip() for line in answer_lines if line.strip()]
    if len(set(lines)) < len(lines):
        return True
    chars = "".join(_CJK.findall("".join(lines)))
    phrases = Counter(chars[i:i + 4] for i in range(len(chars) - 3))
    return any(n >= 3 for n in phrases.values())


def distinct_2(answers: Iterable[str]) -> float:
    """Distinct character bigrams over all bigrams of the answers' Chinese text (1.0: no bigram repeats; 0.0
    for answers without any)."""
    seen, total = set(), 0
    for answer in answers:
        chars = "".join(_CJK.findall(answer))
        grams = [chars[i:i + 2] for i in range(len(chars) - 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0  # no two Chinese characters in a row anywhere: nothing distinct
