"""GRPO's multi-turn rollouts with tools (issue 47, item 2): a completion that calls pauses, the tool runs, its result
is appended as the chat template renders it, sampling goes on; the tool results stay in the sequence and out of the
loss, the KL and the token counts; the rewards see the trajectory."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from conftest import run_train_cli

import minillm.infer.tool_rollouts as tool_rollouts
from minillm.data.prompts import PromptDataset
from minillm.eval.rewards import ToolAnswer, build_rewards, check_request_fields, composite
from minillm.infer.poem_tools import select_tools
from minillm.infer.tool_rollouts import Trajectory, sample_with_tools, tool_turn_ids
from minillm.infer.tools import Call, run_call
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.train.grpo import GRPO

QUESTION = "《春晓》的第一句是什么？"


@pytest.fixture(scope="module")
def tools():
    return select_tools("all")


@pytest.fixture(scope="module")
def schemas(tools):
    return [t.schema() for t in tools.values()]


def turn_ids(tokenizer, schemas, turn: dict) -> list[int]:
    """The ids the model samples for one assistant turn: as the template renders it, up to its <|im_end|>."""
    user = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.render_conversation(user, add_generation_prompt=True, tools=schemas)[0]
    whole = tokenizer.render_conversation(user + [turn], tools=schemas)[0]
    assert whole[:len(prompt)] == prompt
    rest = whole[len(prompt):]
    return rest[:rest.index(tokenizer.im_end_id) + 1]


def call_turn(call: Call, call_id: str = "call_1") -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [call.message(call_id)]}


def test_the_tool_turn_continues_the_rendered_conversation(tokenizer, tools, schemas):
    """prompt + the sampled call + tool_turn_ids == the template's rendering of the whole conversation, whose next
    assistant turn then starts: the trajectory is token for token what SFT trained on."""
    call = Call("search_poems", {"query": "春晓"})
    result = run_call(call, tools)
    user = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.render_conversation(user, add_generation_prompt=True, tools=schemas)[0]
    sampled = turn_ids(tokenizer, schemas, call_turn(call))
    assert sampled[-1] == tokenizer.im_end_id and tokenizer.tool_ids["<tool_call>"] in sampled
    conversation = user + [call_turn(call), {"role": "tool", "tool_call_id": "call_1", "content": result}]
    want = tokenizer.render_conversation(conversation, add_generation_prompt=True, tools=schemas)[0]
    assert prompt + sampled + tool_turn_ids(tokenizer, [call], [result], schemas) == want
    assert tokenizer.tool_ids["<tool_response>"] in want[len(prompt) + len(sampled):]


class Script:
    """sample_groups replaced by fixed turns: the first round gives row k the turn first[k % len(first)], every
    later round the answer; records the prompts each round sampled from."""

    def __init__(self, first: list[list[int]], answer: list[int]) -> None:
        self.first, self.answer, self.rounds = first, answer, []

    def __call__(self, model, prompts, n, max_new_tokens, temperature, stops, generator=None):
        self.rounds.append([list(p) for p in prompts])
        rows = len(prompts) * n
        if len(self.rounds) == 1:
            return [list(self.first[k % len(self.first)]) for k in range(rows)]
        return [list(self.answer) for _ in range(rows)]


@pytest.fixture()
def turns(tokenizer, schemas):
    call = Call("search_poems", {"query": "春晓"})
    answer = tokenizer.encode("春眠不觉晓") + [tokenizer.im_end_id]
    malformed = [tokenizer.tool_ids["<tool_call>"], *tokenizer.encode("not json"),
                 tokenizer.tool_ids["</tool_call>"], tokenizer.im_end_id]
    unknown = turn_ids(tokenizer, schemas, call_turn(Call("nope", {"x": 1})))
    return {"call": call, "call_ids": turn_ids(tokenizer, schemas, call_turn(call)), "answer": answer,
            "malformed": malformed, "unknown": unknown}


def test_a_calling_row_pauses_runs_the_tool_and_goes_on(tokenizer, tools, schemas, turns, monkeypatch):
    script = Script([turns["call_ids"], turns["answer"], turns["malformed"], turns["unknown"]], turns["answer"])
    monkeypatch.setattr(tool_rollouts, "sample_groups", script)
    user = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.render_conversation(user, add_generation_prompt=True, tools=schemas)[0]
    model = MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))
    rows = sample_with_tools(model, tokenizer, [prompt], 4, 40, 1.0, tools, max_turns=2)
    called, direct, malformed, unknown = rows
    result = run_call(turns["call"], tools)
    conversation = user + [call_turn(turns["call"]), {"role": "tool", "tool_call_id": "call_1", "content": result}]
    resumed = tokenizer.render_conversation(conversation, add_generation_prompt=True, tools=schemas)[0]
    # The calling row: prompt, its call, the tool turn (rendered), its answer; two sampled spans, the result between.
    assert called.ids == resumed + turns["answer"] and called.prompt_length == len(prompt)
    start = len(prompt) + len(turns["call_ids"])
    assert called.sampled == [(len(prompt), start), (len(resumed), len(called.ids))]
    assert called.calls == [turns["call"]] and called.results == [result] and result.startswith("《")
    assert called.answer == turns["answer"] and not called.malformed and not called.exhausted
    # The second round sampled from the two rows that called a tool, each with its result appended.
    assert len(script.rounds) == 2 and script.rounds[1][0] == resumed
    assert direct.ids == prompt + turns["answer"] and direct.sampled == [(len(prompt), len(direct.ids))]
    assert malformed.malformed and not malformed.calls and len(malformed.sampled) == 1
    assert unknown.results == ["error: no tool named 'nope' (tools: search_poems, rhyme)"]
    assert called.sampled_tokens == len(turns["call_ids"]) + len(turns["answer"])
    # A checkpoint between --num_iterations updates keeps trajectories as plain data, read back with weights_only.
    buffer = io.BytesIO()
    torch.save([row.to_dict() for row in rows], buffer)
    buffer.seek(0)
    assert [Trajectory.from_dict(d) for d in torch.load(buffer, weights_only=True)] == rows


def test_out_of_turns_the_trajectory_ends_exhausted(tokenizer, tools, schemas, turns, monkeypatch):
    monkeypatch.setattr(tool_rollouts, "sample_groups", Script([turns["call_ids"]], turns["call_ids"]))
    prompt = tokenizer.render_conversation([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tools=schemas)[0]
    model = MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))
    for max_turns in (1, 3):
        (row,) = sample_with_tools(model, tokenizer, [prompt], 1, 40, 1.0, tools, max_turns=max_turns)
        assert row.exhausted and len(row.sampled) == max_turns + 1 and len(row.calls) == max_turns
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        sample_with_tools(model, tokenizer, [prompt], 1, 40, 1.0, tools, max_turns=0)


def test_no_gradient_flows_through_tool_results(tokenizer, tools, schemas, turns, monkeypatch, tmp_path):
    """The step's loss has exactly zero gradient at every position that predicts a tool-result token, a real one
    at every sampled position; the token counts (length normalisation, mean length) leave the results out, and
    the rewards see the calls."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": QUESTION}]}, ensure_ascii=False) + "\n")
    data = PromptDataset(path, tokenizer, max_length=512, tools=schemas)
    batch = [torch.stack(t) for t in zip(data[0])]
    torch.manual_seed(0)
    policy = MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)).train()
    seen = []

    def reward(request: str, answer: str) -> float:
        seen.append(answer)
        return float(len(answer.calls))

    for loss_type in ("grpo", "dapo"):
        monkeypatch.setattr(tool_rollouts, "sample_groups", Script([turns["call_ids"], turns["answer"]],
                                                                    turns["answer"]))
        objective = GRPO({"calls": (reward, 1.0)}, tokenizer, group_size=2, max_new_tokens=40, loss_type=loss_type,
                         tools=tools, max_turns=2)
        objective.prepare(policy, data, torch.device("cpu"), torch.float32)
        captured = []

        def keep(module, args, output, captured=captured):
            output.logits.retain_grad()
            captured.append(output.logits)

        handle = policy.register_forward_hook(keep)
        objective.begin_step([batch])
        out = objective(policy, batch)
        handle.remove()
        out.loss.backward()
        policy.zero_grad()
        grad = captured[-1].grad  # [2, T - 1, V]: position t predicts token t + 1
        prompt_len = len(data.prompts[0])
        call_end = prompt_len + len(turns["call_ids"])
        resumed = call_end + len(tool_turn_ids(tokenizer, [turns["call"]], [run_call(turns["call"], tools)], schemas))
        tool_positions = range(call_end - 1, resumed - 1)  # predicting the tool turn's tokens
        assert grad[0, tool_positions].abs().max().item() == 0.0
        assert grad[0, :prompt_len - 1].abs().max().item() == 0.0
        for t in [*range(prompt_len - 1, call_end - 1), *range(resumed - 1, resumed - 1 + len(turns["answer"]))]:
            assert grad[0, t].abs().max().item() > 0, t
        sampled = len(turns["call_ids"]) + 2 * len(turns["answer"])  # row 0: call + answer; row 1: answer
        assert out.metrics["completions/mean_length"].item() == sampled
        assert out.counters["rollout_tokens"] == sampled
        assert out.metrics["tools/calls"].item() == 1 and out.metrics["tools/errors"].item() == 0
        assert [len(a.calls) for a in seen[-2:]] == [1, 0] and seen[-2] == "春眠不觉晓<|im_end|>"


def test_tool_rewards_pay_the_right_answer_and_charge_broken_or_needless_calls():
    quote = {"kind": "quote", "clause": "春眠不觉晓"}
    rewards = build_rewards("tool,request", None, None, known={QUESTION: quote, "写一首诗": {"kind": "form",
                                                                                              "form": "五言绝句"}})
    tool, request = rewards["tool"][0], rewards["request"][0]
    good = ToolAnswer("第一句是“春眠不觉晓”。<|im_end|>", [Call("search_poems", {"query": "春晓"})], ["..."])
    broken = ToolAnswer(str(good), good.calls, ["error: search_poems: boom"])
    malformed = ToolAnswer(str(good), [], [], malformed=True)
    wrong = ToolAnswer("第一句是“处处闻啼鸟”。<|im_end|>", good.calls, ["..."])
    assert (tool(QUESTION, good), tool(QUESTION, broken), tool(QUESTION, malformed), tool(QUESTION, wrong)) == (
        1.0, 0.5, 0.5, 0.0)
    assert request(QUESTION, good) == 1.0 and request(QUESTION, wrong) == 0.0
    # A writing request: no call costs nothing, a call costs 0.5, a broken one 1.
    assert tool("写一首诗", ToolAnswer("x")) == 0.0 and tool("写一首诗", good) == -0.5 and tool("写一首诗", broken) == -1.0
    poem = "春晓\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。<|im_end|>"
    both = composite(lambda q, a: 1.0)
    assert both("写一首诗", ToolAnswer(poem)) - both("写一首诗", ToolAnswer(poem, good.calls, ["..."])) == 0.5
    for bad in ({"kind": "tone", "char": "霜", "level": "上"}, {"kind": "quote"}):
        with pytest.raises(ValueError, match='"request" must be'):
            check_request_fields(bad, "line 1")
    assert ToolAnswer("abc") == "abc" and ToolAnswer("abc").calls == []


def test_the_cli_trains_with_tools_and_refuses_bad_tool_flags(tmp_path, tiny_sft_dir, capsys):
    start = tmp_path / "start"
    shutil.copytree(tiny_sft_dir, start)
    config = json.loads((start / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # RoPE: more positions, the same weights
    (start / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": [{"role": "user", "content": QUESTION}], "request": {"kind": "quote", "clause": "春眠不觉晓"}},
             {"prompt": [{"role": "user", "content": "“霜”字是平声还是仄声？"}],
              "request": {"kind": "tone", "char": "霜", "level": "平"}}]
    prompts.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    common = ["--init_from", start, "--data_path", prompts, "--eval_data", "", "--max_steps", "2", "--group_size",
              "2", "--max_new_tokens", "16", "--batch_size", "2", "--max_length", "512", "--tools", "all"]
    code, _, err = run_train_cli("grpo", *common, "--out_dir", tmp_path / "o", "--max_turns", "1",
                                 "--log_completions", capsys=capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2 and all({"tools/calls", "tools/errors", "tools/malformed"} <= r.keys() for r in steps)
    # Issue 47, item 4: the GRPO model's card shows the reward at the start and the end.
    card = (tmp_path / "o" / "README.md").read_text()
    assert (f"| reward | {steps[0]['reward']:.3f} over the first 1 steps, {steps[1]['reward']:.3f} over the last 1 "
            "(metrics.jsonl) |") in card
    for flags, message in ((["--tools", "nope"], "--tools: no tool named 'nope'"),
                           (["--max_turns", "0"], "--max_turns must be in [1, 8], got 0"),
                           (["--max_turns", "9"], "--max_turns must be in [1, 8], got 9")):
        code, _, err = run_train_cli("grpo", *common, "--out_dir", tmp_path / "bad", *flags, capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_a_trajectory_of_one_turn_is_the_plain_completion():
    row = Trajectory.single([1, 2, 3], [4, 5])
    assert (row.ids, row.prompt_length, row.sampled, row.answer, row.sampled_tokens) == (
        [1, 2, 3, 4, 5], 3, [(3, 5)], [4, 5], 2)


def test_the_shipped_rl_prompts_load_with_tools_and_their_fields_check(tokenizer, schemas):
    """dataset/rl_tools.jsonl: every line renders with the tools and has fields the rewards accept; a right answer
    to a quote or tone line earns the tool reward, a wrong one nothing."""
    from conftest import REPO

    from minillm.data.prompts import prompt_requests

    data = PromptDataset(REPO / "dataset" / "rl_tools.jsonl", tokenizer, max_length=512, tools=schemas)
    known = prompt_requests(data)
    assert len(data) == 700 and data.dropped == 0 and len(known) >= 650
    tool = build_rewards("tool", None, None, known=known)["tool"][0]
    kinds = {}
    for request, fields in known.items():
        kinds[fields["kind"]] = kinds.get(fields["kind"], 0) + 1
        if fields["kind"] == "quote":
            assert tool(request, ToolAnswer(f"是“{fields['clause']}”。")) == 1.0
            assert tool(request, ToolAnswer("不知道。")) == 0.0
        elif fields["kind"] == "tone":
            other = "仄" if fields["level"] == "平" else "平"
            assert tool(request, ToolAnswer(f"{fields['level']}声。")) == 1.0
            assert tool(request, ToolAnswer(f"{other}声。")) == 0.0
    assert kinds.keys() == {"quote", "tone", "tune", "form", "words"}
