"""Copy blocks (minillm/data/copying.py): what they hold, how PackedDataset mixes them in, and the flag."""

import json

import numpy as np
import pytest
import torch
from conftest import run_train_cli, tiny_pretrain

from minillm.data.copying import SPAN_MAX, copy_block
from minillm.data.packed import PackedDataset, prepare_tokens
from minillm.data.tokenizer import load_tokenizer


def induction(ids: np.ndarray, t: int) -> int | None:
    """What a perfect copier predicts at t: the token after the last earlier occurrence of ids[t - 1]."""
    for s in range(t - 2, -1, -1):
        if ids[s] == ids[t - 1]:
            return int(ids[s + 1])
    return None


@pytest.mark.parametrize("n", [2, 17, 128, 512])
@pytest.mark.parametrize("index", [0, 1, 99])
def test_every_learned_label_is_a_copy_and_only_copies_are_learned(n, index):
    tokens = np.arange(1000, 1000 + n, dtype=np.uint16)  # distinct, so the copy is the only way to predict
    ids, mask = copy_block(tokens, index)
    assert ids.shape == mask.shape == (n,) and ids.dtype == tokens.dtype
    assert set(ids.tolist()) <= set(tokens.tolist())
    learned = np.flatnonzero(mask)
    assert mask[0] == 0 and set(mask.tolist()) <= {0.0, 1.0}
    for t in learned:
        assert induction(ids, t) == ids[t]
    # the first copy of each span is never learned: its tokens occur there for the first time
    first_seen = [t for t in range(n) if ids[t] not in ids[:t]]
    assert not mask[first_seen].any()
    if n >= 128:  # a span (4-16), a gap (0-8), its copy: about a third of the labels are learned
        assert 0.25 * n < len(learned) < 0.5 * n
    same_ids, same_mask = copy_block(tokens, index)
    assert np.array_equal(ids, same_ids) and np.array_equal(mask, same_mask)
    if n >= 17:
        assert not np.array_equal(ids, copy_block(tokens, index + 1)[0])


def test_spans_have_the_documented_lengths():
    ids, mask = copy_block(np.arange(4096, dtype=np.uint16), 7)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]))))[::2]  # lengths of learned runs
    assert runs.max() <= SPAN_MAX - 1 and runs.min() >= 3  # a span of k tokens has k - 1 learned labels
    assert len(set(runs.tolist())) > 5


@pytest.fixture
def cache(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"text": "春眠不觉晓，处处闻啼鸟。" * (k + 1)}, ensure_ascii=False) + "\n"
                           for k in range(30)), encoding="utf-8")
    prepare_tokens(src, load_tokenizer(), tmp_path / "p.tokens.bin", progress=False)
    return tmp_path / "p.tokens.bin"


def test_packed_dataset_appends_copy_blocks_after_the_corpus_blocks(cache):
    plain = PackedDataset(cache, 33)
    mixed = PackedDataset(cache, 33, copy_share=0.25)
    blocks = len(plain)
    assert mixed.blocks == blocks and len(mixed) == blocks + round(blocks / 3)
    for i in range(blocks):  # the corpus is seen whole, unchanged
        assert all(torch.equal(a, b) for a, b in zip(plain[i], mixed[i]))
    for k in range(len(mixed) - blocks):
        x, y, m = mixed[blocks + k]
        source = torch.cat([plain[k % blocks][0], plain[k % blocks][1][-1:]])  # the block's 33 tokens
        ids, mask = copy_block(source.numpy(), k)
        assert torch.equal(x, torch.from_numpy(ids[:-1].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(ids[1:].astype(np.int64)))
        assert torch.equal(m, torch.from_numpy(mask[1:])) and m.sum() > 0
    assert mixed.identity() == {**plain.identity(), "examples": len(mixed), "copy_share": 0.25}
    with pytest.raises(ValueError, match="copy_share"):
        PackedDataset(cache, 33, copy_share=1.0)


def test_copy_share_flag_trains_and_needs_the_packed_cache(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"第{k}首。春眠不觉晓，处处闻啼鸟。"}, ensure_ascii=False) + "\n"
                              for k in range(40)), encoding="utf-8")
    code, _, err = tiny_pretrain(tmp_path / "out", corpus, "--copy_share", "0.5", "--max_steps", "3", capsys=capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    code, _, err = run_train_cli("pretrain", "--no-packed", "--copy_share", "0.5", "--data_path", corpus,
                                 "--eval_data", "", "--out_dir", tmp_path / "out2", capsys=capsys)
    assert code != 0 and "--copy_share needs the packed token cache" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()
