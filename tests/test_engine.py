"""The batched engine (minillm/infer/engine.py): prompts x n completions together, each prompt read once."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomized

from minillm.infer.engine import sample_groups
from minillm.infer.generation import generate
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return randomized(MiniLLM(config), scale=0.3).eval()


PROMPTS = [[5, 17, 33], [2, 9, 40, 41, 7, 8, 30], [11], [60, 61, 62, 63, 64]]


def test_greedy_rows_are_each_prompts_own_greedy_continuation(model):
    """Every row of a group equals generate() on its prompt alone: the prompt's KV, copied to the group's rows,
    and the masked attention over rows of different lengths are those of decoding it alone."""
    rows = sample_groups(model, PROMPTS, 3, 20, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, prompt, 20, temperature=0)[0, len(prompt):].tolist()
        assert rows[3 * i:3 * i + 3] == [alone] * 3


def test_rows_stop_after_their_stop_id_and_within_the_budget_and_the_context(model):
    free = [generate(model, p, 20, temperature=0)[0, len(p):].tolist() for p in PROMPTS]
    stops = {free[0][1], free[2][2], free[3][0]} - set(free[1])  # three groups end early, one runs on
    rows = sample_groups(model, PROMPTS, 2, 20, temperature=0, stop_ids=sorted(stops))
    for i, row in enumerate(rows):
        expected = free[i // 2]
        cut = next((k + 1 for k, t in enumerate(expected) if t in stops), 20)
        assert row == expected[:cut]
    assert max(map(len, rows)) == 20 and sum(len(r) < 5 for r in rows) >= 4  # the batch shrank to the long rows
    long = [list(range(1, 60))]  # 59 tokens: 5 positions left in the context of 64
    assert [len(r) for r in sample_groups(model, long, 2, 20, temperature=0)] == [5, 5]
    with pytest.raises(ValueError, match="leaves no room"):
        sample_groups(model, [list(range(64))], 2, 4)


def test_sampled_first_tokens_follow_the_models_distribution(model):
    """400 rows of one prompt: the first tokens' frequencies against softmax(logits) (total variation < 0.1), and
    rows differ from each other."""
    prompt = [5, 17, 33]
    g = torch.Generator().manual_seed(0)
    rows = sample_groups(model, [prompt], 400, 3, temperature=1.0, generator=g)
    with torch.inference_mode():
        p = F.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    counts = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=p.numel()).float()
    assert 0.5 * (counts / counts.sum() - p).abs().sum() < 0.1
    assert len({tuple(r) for r in rows}) > 100
    again = sample_groups(model, [prompt], 400, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert again == rows  # the same generator state, the same completions
