"""The sharded packed cache: many files (.jsonl, .jsonl.gz, .txt), several processes, the same token stream."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, run_train_cli

from minillm.data.jsonl import DataError
from minillm.data.packed import PackedDataset, packed_cache
from minillm.data.shards import build_shards, resolve_sources


def poems(n: int, start: int = 0) -> list[str]:
    """n texts of the shipped corpus."""
    lines = (REPO / "dataset" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[start:start + n]
    return [json.loads(line)["text"] for line in lines]


def stream(index) -> np.ndarray:
    """The whole token stream of a shard index."""
    data = PackedDataset(index, max_length=8)
    return data.shards.slice(0, data.n_tokens)


def test_sharded_cache_on_two_processes_equals_the_single_file_cache(tmp_path, tokenizer):
    shutil.copy(REPO / "dataset" / "pretrain.jsonl", tmp_path / "pretrain.jsonl")
    single = packed_cache(tmp_path / "pretrain.jsonl", tokenizer, progress=False)
    index = build_shards(tmp_path / "pretrain.jsonl", tokenizer, num_proc=2, shard_bytes=1 << 20, progress=False)
    assert len(json.loads(index.read_text())["shards"]) > 4  # the file was cut into several ranges
    header = json.loads((tmp_path / "pretrain.tokens.bin.json").read_text())
    assert np.array_equal(stream(index), np.fromfile(single, dtype=header["dtype"]))
    a, b = PackedDataset(single, max_length=256), PackedDataset(index, max_length=256)
    assert len(a) == len(b) and all(torch.equal(a[i][1], b[i][1]) for i in range(0, len(a), 97))
    assert b[len(b) - 1][0].shape == (255,)  # the last block, read across a shard boundary if need be


def test_a_directory_of_jsonl_gz_and_txt_files_in_path_order(tmp_path, tokenizer):
    data = tmp_path / "corpus"
    (data / "b").mkdir(parents=True)
    texts = {"a.jsonl": poems(5), "b/c.jsonl.gz": poems(4, 5), "b/d.txt": poems(3, 9)}
    (data / "a.jsonl").write_text("\ufeff" + "".join(json.dumps({"text": t}) + "\n\n" for t in texts["a.jsonl"]),
                                  encoding="utf-8")
    with gzip.open(data / "b" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts["b/c.jsonl.gz"])
    (data / "b" / "d.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts["b/d.txt"]), encoding="utf-8")
    (data / "notes.md").write_text("not data")
    assert [p.relative_to(data).as_posix() for p in resolve_sources(data)] == ["a.jsonl", "b/c.jsonl.gz", "b/d.txt"]
    assert resolve_sources(str(data / "b" / "*.txt")) == [data / "b" / "d.txt"]
    docs = texts["a.jsonl"] + texts["b/c.jsonl.gz"] + [t.replace("\n", " ") for t in texts["b/d.txt"]]
    expected = [i for doc in docs for i in (*tokenizer.encode(doc), tokenizer.eos_id)]
    index = build_shards(data, tokenizer, num_proc=2, shard_bytes=200, progress=False)
    assert stream(index).tolist() == expected
    assert index.parent.parent == data  # the cache lives beside the data


def test_an_interrupted_build_keeps_its_finished_shards(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in poems(300)), encoding="utf-8")
    index = build_shards(tmp_path / "c.jsonl", tokenizer, shard_bytes=4096, progress=False)
    full = stream(index)
    shards = sorted(index.parent.glob("shard_*.bin"))
    assert len(shards) > 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()  # as if the build had been killed before this shard finished
    index.unlink()
    index = build_shards(tmp_path / "c.jsonl", tokenizer, shard_bytes=4096, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(index.parent.glob("shard_*.bin"))}
    assert [n for n in after if after[n] != before[n]] == [shards[2].name]  # only the missing one was rebuilt
    assert np.array_equal(stream(index), full)


def test_a_bad_line_names_its_file_and_line_from_a_worker(tmp_path, tokenizer):
    lines = [json.dumps({"text": t}) + "\n" for t in poems(200)]
    lines[150] = '{"text": 5}\n'
    (tmp_path / "c.jsonl").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{tmp_path / 'c.jsonl'}:151: .*\"text\""):
        build_shards(tmp_path / "c.jsonl", tokenizer, num_proc=2, shard_bytes=4096, progress=False)
    assert not list((tmp_path).glob(".minillm-tokens-*/index.json"))  # nothing vouches for a partial cache


def test_training_on_a_directory_with_two_tokenizer_processes(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in poems(80, 80 * i)),
                                             encoding="utf-8")
    code, out, err = run_train_cli("pretrain", "--data_path", data, "--num_proc", "2", "--eval_data", "",
                                   "--out_dir", tmp_path / "out", "--max_length", "32", "--batch_size", "2",
                                   "--max_steps", "2", "--hidden_size", "64", "--num_hidden_layers", "2",
                                   "--num_attention_heads", "4", "--num_key_value_heads", "2", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    code, _, err = run_train_cli("pretrain", "--data_path", tmp_path / "nothing-*.jsonl", "--eval_data", "",
                                 "--out_dir", tmp_path / "o2", capsys=capsys)
    assert code == 1 and "no such file, and no .jsonl, .jsonl.gz, .txt files there" in err


@pytest.mark.parametrize("case", ["truncated", "not_gzip", "only_empty"])
def test_broken_or_empty_sources_are_one_line_naming_the_file(tmp_path, capsys, case):
    """Issue 26, item 13: EOFError traceback, "Not a gzipped file" without the file, "__len__() should return >= 0"."""
    data = tmp_path / "data"
    data.mkdir()
    if case == "truncated":
        whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in poems(50)).encode())
        (data / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
        needle = f"{data / 'a.jsonl.gz'}: not a complete gzip file after"
    elif case == "not_gzip":
        (data / "a.jsonl.gz").write_text('{"text": "plain"}\n', encoding="utf-8")
        needle = f"{data / 'a.jsonl.gz'}: not a complete gzip file after 0 lines"
    else:
        (data / "a.jsonl").write_text("", encoding="utf-8")
        needle = "0 tokens are too few for one block of max_length=32: nothing to learn"
    code, _, err = run_train_cli("pretrain", "--data_path", data, "--eval_data", "", "--out_dir", tmp_path / "out",
                                 "--max_length", "32", "--max_steps", "1", capsys=capsys)
    assert code == 1 and "Traceback" not in err and needle in err.strip().splitlines()[-1], err


def test_damaged_shards_are_rebuilt_and_sources_are_known_by_content(tmp_path, tokenizer, capsys):
    """Issue 26, item 12: shards overwritten in place were trained on (0xFFFF: an IndexError naming no shard;
    7: garbage, exit 0), and a source edited with its size and mtime kept reused the stale cache."""
    import os

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in poems(60)), encoding="utf-8")
    index = build_shards(data, tokenizer, shard_bytes=2000, progress=False)
    good = stream(index).copy()
    shards = sorted(index.parent.glob("shard_*.bin"))
    assert len(shards) >= 3
    for value in (0xFFFF, 7):  # an id past the vocabulary, and a valid one: both are damage
        raw = np.fromfile(shards[1], dtype=np.uint16)
        np.full_like(raw, value).tofile(shards[1])
        assert not np.array_equal(stream(index), good)
        index = build_shards(data, tokenizer, shard_bytes=2000, progress=False)
        assert np.array_equal(stream(index), good)
        assert f"note: {shards[1]} does not match the checksum" in capsys.readouterr().err
    # Same size, same mtime, other text: the shard is rebuilt and the identity a resume checks changes.
    before = json.loads(index.read_text())["sha256"]
    st = data.stat()
    text = data.read_text(encoding="utf-8")
    assert poems(1)[0][:2] in text
    data.write_text(text.replace(poems(1)[0][:2], poems(1)[0][1::-1], 1), encoding="utf-8")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    index = build_shards(data, tokenizer, shard_bytes=2000, progress=False)
    assert json.loads(index.read_text())["sha256"] != before and not np.array_equal(stream(index), good)
