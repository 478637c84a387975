"""Tests for minillm.data.datasets: exact (X, Y, loss_mask) values, SFT masks, packed cache, bad input."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import minillm.data.datasets as data
import minillm.data.jsonl as jsonl
import minillm.data.packed as packed
from minillm.data.datasets import DataError, PretrainDataset, SFTDataset, check_token_ids, check_vocab
from minillm.data.jsonl import index_lines
from minillm.data.packed import PackedDataset, load_packed_header, packed_cache, prepare_tokens
from minillm.data.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! The model learns to stop.",
    "def f(x):\n    return x + 1\n\n\nprint(f(2))",
    "Indented:\n  two spaces\n    four spaces\n\n\n\nmany newlines",
    "café, naïve, 日本語, emoji 🙂 and tabs\tand more",
    "The user asks and the assistant answers.",
]


def write_jsonl(path: Path, records: list, blank_between: bool = False) -> Path:
    sep = "\n\n" if blank_between else "\n"
    path.write_text(sep.join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained once per session (vocab ~300)."""
    corpus = tmp_path_factory.mktemp("tok") / "corpus.jsonl"
    write_jsonl(corpus, [{"text": t} for t in CORPUS * 20])
    tokenizer = train_tokenizer([corpus], vocab_size=300)
    assert tokenizer.pad_id == tokenizer.eos_id == 0
    return tokenizer


@pytest.fixture(scope="session")
def tok_small(tmp_path_factory):
    """A different tokenizer (smaller vocabulary): a changed fingerprint."""
    corpus = tmp_path_factory.mktemp("tok2") / "corpus.jsonl"
    write_jsonl(corpus, [{"text": t} for t in CORPUS * 20])
    return train_tokenizer([corpus], vocab_size=280)


def as_lists(example):
    X, Y, mask = example
    assert X.dtype == torch.long and Y.dtype == torch.long and mask.dtype == torch.float32
    return X.tolist(), Y.tolist(), mask.tolist()


# ---------------------------------------------------------------------------------------------
# PretrainDataset


def test_pretrain_short_example_is_padded_and_learns_the_closing_eos(tok, tmp_path):
    text = "Hello world!"
    ids = tok.encode(text)
    n = len(ids) + 1  # text + <|endoftext|>
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": text}]), tok, max_length=n + 3)
    X, Y, mask = as_lists(ds[0])
    assert X == ids + [0, 0, 0]
    assert Y == ids[1:] + [0, 0, 0, 0]
    assert mask == [1.0] * (n - 1) + [0.0] * 3
    # pad == eos: the label at position n-2 is the eos (== pad id) yet it is learned.
    assert Y[n - 2] == tok.pad_id and mask[n - 2] == 1.0
    assert mask != [float(y != tok.pad_id) for y in Y]  # the classic pad-mask bug would differ here


def test_pretrain_exact_fit_has_no_padding(tok, tmp_path):
    text = "The quick brown fox"
    ids = tok.encode(text)
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": text}]), tok, max_length=len(ids) + 1)
    X, Y, mask = as_lists(ds[0])
    assert X == ids
    assert Y == ids[1:] + [tok.eos_id]
    assert mask == [1.0] * len(ids)


def test_pretrain_truncated_example_drops_the_eos(tok, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert len(ids) > 6
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": text}]), tok, max_length=6)
    X, Y, mask = as_lists(ds[0])
    assert X == ids[:5] and Y == ids[1:6] and mask == [1.0] * 5


def test_pretrain_skips_blank_lines_and_reads_every_record(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\t\n{"text": "b c"}\r\n\n{"text": "d"}', encoding="utf-8")
    ds = PretrainDataset(path, tok, max_length=8)
    assert len(ds) == 3
    assert [ds.text(i) for i in range(3)] == ["a", "b c", "d"]
    assert ds[2][0].tolist()[:2] == tok.encode("d") + [tok.eos_id]
    assert ds.validate() == 3


def test_pretrain_empty_text_contributes_no_loss(tok, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": ""}]), tok, max_length=4)
    X, Y, mask = as_lists(ds[0])
    assert X == [0, 0, 0] and Y == [0, 0, 0] and mask == [0.0, 0.0, 0.0]


def test_dataloader_workers_read_the_same_examples(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    ds = PretrainDataset(path, tok, max_length=12)
    ds[0]  # opens the file handle in the parent before the workers fork
    serial = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    for name, k in (("X", 0), ("Y", 1), ("mask", 2)):
        got = torch.cat([b[k] for b in batches])
        assert torch.equal(got, torch.stack([s[k] for s in serial])), name


# ---------------------------------------------------------------------------------------------
# Line index


def naive_offsets(raw: bytes) -> list[int]:
    offsets, pos = [], 0
    for line in raw.splitlines(keepends=True):
        if line.strip():
            offsets.append(pos)
        pos += len(line)
    return offsets


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 22])
def test_line_index_matches_a_naive_scan_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    rng = np.random.default_rng(0)
    pieces = [b'{"text": "x"}', b"", b"  ", b"\t", b'{"text": "' + b"y" * 50 + b'"}', b"\r", b"z"]
    raw = b"\n".join(pieces[i] for i in rng.integers(0, len(pieces), 200)) + b'\n  {"a": 1}'
    path = tmp_path / "f.jsonl"
    path.write_bytes(raw)
    monkeypatch.setattr(jsonl, "_SCAN_CHUNK", chunk)
    assert index_lines(path, cache=False).tolist() == naive_offsets(raw)


def test_line_index_is_cached_reused_and_rebuilt_when_stale(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}])
    idx = Path(str(path) + ".idx")
    assert len(PretrainDataset(path, tok)) == 2 and idx.is_file()

    calls = []
    real_scan = jsonl._scan_line_offsets
    monkeypatch.setattr(jsonl, "_scan_line_offsets", lambda p: calls.append(p) or real_scan(p))
    assert len(PretrainDataset(path, tok)) == 2
    assert calls == []  # served from the cache

    write_jsonl(path, [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert len(PretrainDataset(path, tok)) == 3 and len(calls) == 1

    idx.write_bytes(b"garbage")  # damaged cache: rebuilt, not trusted
    assert len(PretrainDataset(path, tok)) == 3 and len(calls) == 2


def test_line_index_stays_in_memory_when_the_folder_is_read_only(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}])

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(jsonl, "atomic_write", refuse)
    ds = PretrainDataset(path, tok, max_length=4)
    assert len(ds) == 2 and ds.text(1) == "b"
    assert not Path(str(path) + ".idx").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file, the line and what was expected.

BAD_LINES = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"txt": "wrong key"}', 'missing field "text"'),
    (b'{"text": 123}', 'field "text" holds int; expected a "text" string'),
    (b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    (b'["a", "list"]', "expected a JSON object"),
    (b'{"text": "lone \\ud800 surrogate"}', "unpaired surrogate"),
]


@pytest.mark.parametrize("bad, expected", BAD_LINES)
def test_bad_pretrain_line_names_file_line_and_expectation(tok, tmp_path, bad, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + bad + b'\n{"text": "also fine"}\n')  # bad line is line 3
    ds = PretrainDataset(path, tok, max_length=8)
    assert len(ds) == 3
    ds[0]  # good lines still load
    for call in (lambda: ds[1], ds.validate):
        with pytest.raises(DataError) as err:
            call()
        assert f"{path}:3:" in str(err.value) and expected in str(err.value)
        assert "expected" in str(err.value)


@pytest.mark.parametrize("bad, expected", BAD_LINES)
def test_bad_line_leaves_no_packed_cache(tok, tmp_path, bad, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' * 3 + bad + b"\n")
    out = tmp_path / "cache" / "bad.tokens.bin"
    with pytest.raises(DataError) as err:
        prepare_tokens(path, tok, out, chunk_size=1, progress=False)
    assert f"{path}:4:" in str(err.value) and expected in str(err.value)
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.parametrize("content, line", [(b"", 1), (b"\n  \n\t\n\n", 4)])
def test_empty_or_blank_only_file_is_rejected_everywhere(tok, tmp_path, content, line):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for make in (
        lambda: PretrainDataset(path, tok),
        lambda: SFTDataset(path, tok),
        lambda: prepare_tokens(path, tok, tmp_path / "e.bin", progress=False),
    ):
        with pytest.raises(DataError) as err:
            make()
        assert f"{path}:{line}:" in str(err.value) and "expected" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "empty.jsonl.idx"]  # no cache


def test_missing_file_is_a_clear_error(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PretrainDataset(tmp_path / "nope.jsonl", tok)


# ---------------------------------------------------------------------------------------------
# SFT


def chatml(tok, role, content, learn_content):
    """Reference pieces for one turn: ids and mask, spelled out."""
    header = tok.encode(f"{role}\n")
    body = tok.encode(content)
    nl = tok.encode("\n")
    ids = [tok.im_start_id] + header + body + [tok.im_end_id] + nl
    flag = 1 if learn_content else 0
    mask = [0] * (1 + len(header)) + [flag] * (len(body) + 1) + [0] * len(nl)
    return ids, mask


def shifted(ids, mask, max_length, pad=0):
    """Reference (X, Y, loss_mask) lists from token ids and a token-level mask."""
    ids = (ids + [pad] * max_length)[:max_length]
    mask = ([float(m) for m in mask] + [0.0] * max_length)[:max_length]
    return ids[:-1], ids[1:], mask[1:]


def test_sft_single_turn_mask_covers_reply_and_im_end_only(tok, tmp_path):
    conv = [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "The fox."}]
    u_ids, u_mask = chatml(tok, "user", "Hello world!", False)
    a_ids, a_mask = chatml(tok, "assistant", "The fox.", True)
    ids, mask = u_ids + a_ids, u_mask + a_mask
    assert ids == tok.encode(tok.apply_chat_template(conv), allow_special=True)  # piecewise == whole-string encoding
    L = len(ids) + 4
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]), tok, max_length=L)
    assert as_lists(ds[0]) == shifted(ids, mask, L)
    X, Y, m = as_lists(ds[0])
    learned = [y for y, k in zip(Y, m) if k]
    assert learned == tok.encode("The fox.") + [tok.im_end_id]
    assert tok.decode(X[: len(ids) - 1] + [Y[len(ids) - 2]]) == tok.apply_chat_template(conv)


def test_sft_multi_turn_masks_every_user_and_system_turn(tok, tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello world!"},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The lazy dog."},
    ]
    ids, mask = [], []
    for turn in conv:
        i, m = chatml(tok, turn["role"], turn["content"], turn["role"] == "assistant")
        ids += i
        mask += m
    assert ids == tok.encode(tok.apply_chat_template(conv), allow_special=True)
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"messages": conv}]), tok, max_length=len(ids))
    assert as_lists(ds[0]) == shifted(ids, mask, len(ids))
    X, Y, m = as_lists(ds[0])
    learned = [y for y, k in zip(Y, m) if k]
    assert learned == tok.encode("Hello world!") + [2] + tok.encode("The lazy dog.") + [2]


@pytest.mark.parametrize(
    "record, user, answer",
    [
        ({"instruct": "Translate.", "input": "Hello", "label": "Bonjour"}, "Translate.\nHello", "Bonjour"),
        ({"instruct": "Say hi.", "input": "", "label": "hi"}, "Say hi.", "hi"),
        ({"instruct": "Say hi.", "label": "hi"}, "Say hi.", "hi"),
        ({"instruction": "Add.", "input": "1 2", "output": "3"}, "Add.\n1 2", "3"),
    ],
)
def test_sft_instruction_formats(tok, tmp_path, record, user, answer):
    conv = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [record]), tok, max_length=64)
    assert ds.messages(0) == conv
    u_ids, u_mask = chatml(tok, "user", user, False)
    a_ids, a_mask = chatml(tok, "assistant", answer, True)
    assert as_lists(ds[0]) == shifted(u_ids + a_ids, u_mask + a_mask, 64)


def test_sft_system_field_and_default_system_prompt(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"instruct": "Q", "input": "", "label": "A", "system": "S1"},
            {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        ],
    )
    ds = SFTDataset(path, tok, max_length=64, system_prompt="S2")
    assert [m["content"] for m in ds.messages(0)] == ["S1", "Q", "A"]  # its own system turn wins
    assert [m["content"] for m in ds.messages(1)] == ["S2", "Q", "A"]
    ids, mask = tok.render_conversation(ds.messages(1))
    assert ids == tok.encode(tok.apply_chat_template(ds.messages(1)), allow_special=True)
    assert sum(mask) == len(tok.encode("A")) + 1


def test_sft_truncation_keeps_mask_aligned_and_cutting_the_reply_gives_zero_loss(tok, tmp_path):
    conv = [
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "Jumps over."},
    ]
    u_ids, u_mask = chatml(tok, "user", conv[0]["content"], False)
    a_ids, a_mask = chatml(tok, "assistant", conv[1]["content"], True)
    ids, mask = u_ids + a_ids, u_mask + a_mask
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])

    header = len(u_ids) + 1 + len(tok.encode("assistant\n"))
    cut = header + 2  # keeps the header and the first two reply tokens
    ds = SFTDataset(path, tok, max_length=cut)
    X, Y, m = as_lists(ds[0])
    assert (X, Y, m) == shifted(ids[:cut], mask[:cut], cut)
    assert [y for y, k in zip(Y, m) if k] == tok.encode("Jumps over.")[:2]

    for short in (header, len(u_ids), 5):  # the reply is cut off entirely
        X, Y, m = as_lists(SFTDataset(path, tok, max_length=short)[0])
        assert X == ids[: short - 1] and Y == ids[1:short]
        assert m == [0.0] * (short - 1)


def test_sft_reply_with_leading_whitespace_keeps_text_and_generation_prompt(tok):
    """Where BPE would merge the header's "\\n" into the reply, the split of generation time is used."""
    diverged = 0
    for reply in ["\n\n\nprint(f(2))", "    return x", "\t\tand more"]:
        conv = [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": reply}]
        ids, mask = tok.render_conversation(conv)
        diverged += ids != tok.encode(tok.apply_chat_template(conv), allow_special=True)
        assert tok.decode(ids) == tok.apply_chat_template(conv)  # same text, whatever the split
        prompt = tok.encode(tok.apply_chat_template(conv[:1], add_generation_prompt=True), allow_special=True)
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
        learned = [i for i, k in zip(ids, mask) if k]
        assert learned == tok.encode(reply) + [tok.im_end_id]
    assert diverged >= 1  # the fixture tokenizer has "\n\n" / "\n  " merges, so the case is exercised


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"conversations": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"conversations": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"conversations": [{"role": "assistant"}]}, 'conversations[0]: missing field "content"'),
        (
            {"conversations": [{"role": "assistant", "content": 5}]},
            'field "content" holds int; expected a "content" string',
        ),
        ({"messages": "hello"}, 'field "messages" must be a non-empty list'),
        ({"conversations": ["hi"]}, "conversations[0]: expected an object"),
        ({"instruct": "Q", "input": ""}, 'missing field "label"'),
        ({"instruction": "Q", "label": "A"}, 'missing field "output"'),
        (
            {"instruct": "Q", "input": None, "label": "A"},
            'field "input" holds NoneType; expected {"instruct"',
        ),
        ({"prompt": "Q", "answer": "A"}, 'no "conversations", "messages", "instruct" or "instruction"'),
    ],
)
def test_bad_sft_line_names_file_line_and_expectation(tok, tmp_path, record, expected):
    good = {"instruct": "Q", "input": "", "label": "A"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    ds = SFTDataset(path, tok, max_length=32)
    ds[0]
    for call in (lambda: ds[1], ds.validate):
        with pytest.raises(DataError) as err:
            call()
        assert f"{path}:2:" in str(err.value) and expected in str(err.value)
        assert "expected" in str(err.value)


def test_bad_json_in_sft_file(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruct": "Q", "label": "A"}\n{"instruct": "Q", "label": "A"\n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON .*expected one JSON object per line"):
        SFTDataset(path, tok)[1]


# ---------------------------------------------------------------------------------------------
# Packed token cache


def test_prepare_tokens_writes_the_concatenated_stream_and_header(tok, tmp_path):
    texts = CORPUS + [""]
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts], blank_between=True)
    out = tmp_path / "cache" / "p.tokens.bin"
    header = prepare_tokens(src, tok, out, chunk_size=2, progress=False)
    stream = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    assert np.fromfile(out, dtype=np.uint16).tolist() == stream
    assert header["n_tokens"] == len(stream) and header["n_documents"] == len(texts)
    assert header["n_chars"] == sum(len(t) for t in texts)
    assert header["dtype"] == "uint16" and header["vocab_size"] == tok.vocab_size
    assert header["tokenizer_fingerprint"] == tok.fingerprint()
    assert header["source"]["size"] == src.stat().st_size and len(header["source"]["sha256"]) == 64
    assert load_packed_header(out) == header
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.tokens.bin", "p.tokens.bin.json"]


def test_packed_blocks_tile_the_token_stream(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    out = tmp_path / "p.tokens.bin"
    prepare_tokens(src, tok, out, progress=False)
    stream = np.fromfile(out, dtype=np.uint16).astype(np.int64)
    for max_length in (2, 9, 33, len(stream)):
        ds = PackedDataset(out, max_length)
        step = max_length - 1
        assert len(ds) == (len(stream) - 1) // step
        xs, ys = [], []
        for i in range(len(ds)):
            X, Y, mask = ds[i]
            assert X.dtype == Y.dtype == torch.long and mask.dtype == torch.float32
            assert X.shape == Y.shape == mask.shape == (step,)
            assert torch.equal(mask, torch.ones(step))
            assert torch.equal(Y[:-1], X[1:])
            xs.append(X)
            ys.append(Y)
        assert torch.cat(xs).tolist() == stream[: len(ds) * step].tolist()
        assert torch.cat(ys).tolist() == stream[1 : len(ds) * step + 1].tolist()
        assert torch.equal(ds[-1][0], xs[-1])
        with pytest.raises(IndexError):
            ds[len(ds)]
    with pytest.raises(DataError, match="too few for one block"):
        PackedDataset(out, len(stream) + 1)


def test_packed_dataset_in_dataloader_workers(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    ds = PackedDataset(packed_cache(src, tok, progress=False), 8)
    ds[0]  # maps the file in the parent first
    got = torch.cat([b[0] for b in DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


class WideTokenizer:
    """Stub with a vocabulary beyond uint16 range, to check the uint32 path."""

    vocab_size, eos_id = 70_000, 0

    def encode_batch(self, texts):
        return [[65_535 + len(t), 69_999] for t in texts]

    def fingerprint(self):
        return "wide"


def test_large_vocabulary_uses_uint32(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": "ab"}, {"text": "c"}])
    out = tmp_path / "w.bin"
    assert prepare_tokens(src, WideTokenizer(), out, progress=False)["dtype"] == "uint32"
    assert np.fromfile(out, dtype=np.uint32).tolist() == [65_537, 69_999, 0, 65_536, 69_999, 0]
    assert PackedDataset(out, 3)[0][0].tolist() == [65_537, 69_999]


def test_packed_cache_is_reused_and_invalidated(tok, tok_small, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    builds = []
    real_prepare = packed.prepare_tokens

    def counting_prepare(*args, **kwargs):
        builds.append(args[1])
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(packed, "prepare_tokens", counting_prepare)
    cache_dir = tmp_path / "cache"
    path = packed_cache(src, tok, cache_dir, progress=False)
    assert path == cache_dir / "p.tokens.bin" and len(builds) == 1
    stamp = path.stat().st_mtime_ns

    assert packed_cache(src, tok, cache_dir, progress=False) == path
    assert len(builds) == 1 and path.stat().st_mtime_ns == stamp  # reused, not rebuilt

    os.utime(src, ns=(time.time_ns(), src.stat().st_mtime_ns + 10**9))  # touched, same bytes
    packed_cache(src, tok, cache_dir, progress=False)
    assert len(builds) == 1

    packed_cache(src, tok_small, cache_dir, progress=False)  # tokenizer changed
    assert builds[-1] is tok_small and len(builds) == 2
    assert load_packed_header(path)["tokenizer_fingerprint"] == tok_small.fingerprint()

    write_jsonl(src, [{"text": t} for t in CORPUS[::-1]])  # same size, new contents
    os.utime(src, ns=(time.time_ns(), src.stat().st_mtime_ns + 2 * 10**9))
    packed_cache(src, tok_small, cache_dir, progress=False)
    assert len(builds) == 3

    write_jsonl(src, [{"text": t} for t in CORPUS + ["one more"]])  # grown
    packed_cache(src, tok_small, cache_dir, progress=False)
    assert len(builds) == 4 and load_packed_header(path)["n_documents"] == len(CORPUS) + 1


def test_packed_cache_defaults_to_the_source_folder(tok, tmp_path):
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in CORPUS])
    path = packed_cache(src, tok, progress=False)
    assert path == tmp_path / "corpus.tokens.bin" and Path(str(path) + ".json").is_file()


def test_interrupted_build_never_looks_complete(tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    cache_dir = tmp_path / "cache"
    path = packed_cache(src, tok, cache_dir, progress=False)  # a complete cache exists
    write_jsonl(src, [{"text": t} for t in CORPUS * 2])  # source changed: the next call rebuilds

    calls = []
    real = tok.encode_batch

    def interrupted(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            assert sorted(p.suffix for p in cache_dir.iterdir()) == [
                ".bin",
                ".tmp",
            ]  # building under a temp name
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        packed_cache(src, tok, cache_dir, chunk_size=2, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["p.tokens.bin"]  # no temporary file left
    assert not Path(str(path) + ".json").exists()  # the old header no longer vouches for anything
    with pytest.raises(DataError, match="incomplete"):
        PackedDataset(path, 8)
    packed_cache(src, tok, cache_dir, progress=False)
    assert load_packed_header(path)["n_documents"] == 2 * len(CORPUS)


def test_truncated_or_damaged_cache_is_rejected(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    path = packed_cache(src, tok, tmp_path / "c", progress=False)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    with pytest.raises(DataError, match="header promises"):
        PackedDataset(path, 8)
    Path(str(path) + ".json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="damaged header"):
        PackedDataset(path, 8)
    packed_cache(src, tok, tmp_path / "c", progress=False)  # both are rebuilt
    assert len(PackedDataset(path, 8)) > 0


# ---------------------------------------------------------------------------------------------
# Vocabulary guards


def test_check_vocab_catches_a_model_smaller_than_the_tokenizer(tok, tmp_path):
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok, tok.vocab_size + 10)
    with pytest.raises(
        ValueError, match=f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is 256"
    ):
        check_vocab(tok, 256)
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in CORPUS])
    packed = PackedDataset(packed_cache(src, tok, progress=False), 8)
    assert packed.max_token_id() < packed.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match=f"PackedDataset has {tok.vocab_size} tokens"):
        check_vocab(packed, 100)
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} tokens"):
        check_vocab(PretrainDataset(src, tok), 100)


def test_check_token_ids_names_the_offending_id():
    check_token_ids(torch.tensor([[0, 5], [9, 3]]), 10)
    check_token_ids(torch.zeros(0, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"token id 10 at position \(1, 0\).*\[0, 10\)"):
        check_token_ids(torch.tensor([[0, 5], [10, 3]]), 10)
    with pytest.raises(ValueError, match="token id -1"):
        check_token_ids(np.array([3, -1]), 10)


def test_reading_good_lines_never_counts_line_numbers(tok, tmp_path, monkeypatch):
    """Line numbers are computed only for an error message (counting them is a scan of the file)."""

    def scan(*args):
        raise AssertionError("line numbers counted on the happy path")

    monkeypatch.setattr(jsonl, "_line_number", scan)
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    sft = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}] * 3), tok, max_length=16)
    pre = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}] * 3), tok, max_length=16)
    for ds in (sft, pre):
        ds[2]
        assert ds.validate() == 3


def test_file_rewritten_under_an_open_dataset_is_reported_not_misread(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "bb"}])
    ds = PretrainDataset(path, tok, max_length=4)
    path.write_text('{"text": "much longer first line"}\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line index is stale"):
        ds[1]


def test_utf8_byte_order_mark_is_accepted(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [PretrainDataset(path, tok).text(i) for i in range(2)] == ["a", "b"]
    header = prepare_tokens(path, tok, tmp_path / "bom.bin", progress=False)
    assert np.fromfile(tmp_path / "bom.bin", dtype=np.uint16).tolist() == tok.encode("a") + [0] + tok.encode(
        "b"
    ) + [0]
    assert header["n_documents"] == 2


# ---------------------------------------------------------------------------------------------
# Batching helpers


def test_group_by_length_batches_similar_lengths_deterministically():
    lengths = [int(x) for x in torch.randint(1, 200, (100,), generator=torch.Generator().manual_seed(0))]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1)).tolist()
    grouped = data.group_by_length(order, lengths, batch_size=4, window_batches=5, seed=3)
    assert sorted(grouped) == list(range(100))  # a permutation: nothing lost or repeated
    assert grouped == data.group_by_length(order, lengths, batch_size=4, window_batches=5, seed=3)
    for w in range(0, 100, 20):  # each window holds the same examples as before, batches sorted inside
        assert set(grouped[w:w + 20]) == set(order[w:w + 20])
        window_sorted = sorted(order[w:w + 20], key=lambda i: -lengths[i])
        expected_batches = {tuple(window_sorted[b:b + 4]) for b in range(0, 20, 4)}
        assert {tuple(grouped[w + b:w + b + 4]) for b in range(0, 20, 4)} == expected_batches


def test_trim_padding_is_exact(tok):
    x = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    y = torch.tensor([[6, 7, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    m = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    tx, ty, tm = data.trim_padding(x, y, m)
    assert tx.tolist() == [[5, 6, 7], [5, 6, 0]] and tm.tolist() == [[1, 1, 1], [0, 1, 0]]
    assert ty.tolist() == [[6, 7, 0], [6, 0, 0]]
    assert data.trim_padding(x, y, torch.zeros_like(m))[0].shape == (2, 1)


def test_example_lengths_follow_the_mask(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ab"}, {"text": CORPUS[0]}])
    ds = PretrainDataset(path, tok, max_length=16)
    assert data.example_lengths(ds) == [len(tok.encode("ab")), 15]  # text + eos, shifted by one
