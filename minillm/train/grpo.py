"""GRPO (Shao et al., 2024) with verifiable rewards, as an objective of the one training loop.

Per optimizer step, G completions per prompt are sampled from the current policy at `temperature`, every prompt of
every micro-batch of the step in flight together on the batched engine (infer/engine.py: each prompt read once,
its KV copied to its G rows) before the first backward (begin_step), and scored by reward
functions (request, answer) -> float (eval/rewards.py). A completion's advantage is its reward minus its group's
mean, divided by (std + 1e-4): the unbiased std of its group's G rewards (scale_rewards "group", TRL's default),
of the whole step's rewards ("batch"), or not divided ("none"); a group whose rewards are all equal has A = 0 and
gives no gradient (counted in frac_reward_zero_std). Per completion token t of completion i, with
ratio = pi(o_t) / pi_old(o_t) and KL_t = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator):

    clipped types:  -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) + kl_beta * KL_t
    cispo:          -stopgrad(min(ratio, epsilon_high)) * A_i * log pi(o_t)             + kl_beta * KL_t

(with kl_correction, TRL's default use_bias_correction_kl, the KL term is ratio * KL_t)

over the completion up to and including its <|im_end|>, with log-probs of the logits / temperature in float32.
The loss types are TRL's, named as there; they differ in how the token terms are summed:
- grpo: mean over each completion's tokens, then over completions (the paper's);
- dr_grpo: each completion's sum / max_new_tokens, mean over completions (Dr. GRPO);
- bnpo: sum over the micro-batch's tokens / its token count;
- dapo and cispo: sum over the step's tokens / the step's token count (all micro-batches and processes).
With tools (`tools`, `max_turns`), a completion is a trajectory (infer/tool_rollouts.py): assistant turns with the
tools' results between them; only the sampled turns are learned (the results are out of the loss, the KL and the
token counts), and the rewards read the last turn's text with the trajectory's calls attached (eval/rewards.py
ToolAnswer). With num_iterations 1 (the default) there is one update per rollout: pi_old is the same forward
detached, so the ratio is exactly 1 and the gradient is REINFORCE's. With num_iterations N (TRL's name), the step
that samples keeps those detached log-probs (the sampling policy's: no update has happened yet), and the N - 1
steps after it update on the same rollouts, their ratio taken against them (the loop feeds those steps the same
prompts); checkpoints keep the rollouts between, so a resume in the middle continues exactly. The step's loss is the same whatever the accumulation or process count (bnpo: for equal micro-batch
token counts, as in TRL); sampling draws from the run's RNG, which checkpoints save, so a resumed run samples the
same completions.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from minillm.data.prompts import request_of
from minillm.data.tokenizer import Tokenizer
from minillm.eval.heldout import repeats
from minillm.eval.rewards import RewardError, ToolAnswer
from minillm.eval.tasks import answer_body
from minillm.infer.engine import sample_groups
from minillm.infer.tool_rollouts import Trajectory, sample_with_tools
from minillm.infer.tools import Tool
from minillm.model.model import MiniLLM
from minillm.train.distributed import all_reduce_max, all_reduce_sum
from minillm.train.objective import ObjectiveOutput, completion_batch
from minillm.train.reference import Reference

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
CISPO_EPSILON_HIGH = 5.0  # cispo's cap on the importance weight when none is given (ScaleRL's eps_max; TRL's advice)
RewardFn = Callable[[str, str], float]


def group_advantages(rewards_BG: torch.Tensor, scale: str = "group", batch_std: torch.Tensor | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """r - group mean, divided by (std + eps): the group's unbiased std ("group"), `batch_std` or the unbiased std
    of all of `rewards_BG` ("batch"), or nothing ("none"). [B, G]"""
    centred_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred_BG
    if scale == "group":
        return centred_BG / (rewards_BG.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred_BG / ((rewards_BG.std() if batch_std is None else batch_std) + eps)
    raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")


def sequence_losses(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, advantages_N: torch.Tensor,
                    mask_NT: torch.Tensor, epsilon: float, loss_type: str, max_new_tokens: int,
                    ref_logp_NT: torch.Tensor | None = None, kl_beta: float = 0.0, epsilon_high: float | None = None,
                    mean_tokens: float | None = None, kl_correction: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion: (its loss, its mean token KL, the fraction of its tokens where clipping bit); [N] each.

    The mean of the losses is the loss of `loss_type` over these completions. `mean_tokens`: dapo's and cispo's
    tokens per completion over the whole step (None: over these completions), so that micro-batches weighted by
    their completions add up to the step's token mean. `kl_correction`: the KL term times the ratio (TRL's
    use_bias_correction_kl; the ratio's gradient then reaches the KL term even where the ratio is 1)."""
    high = epsilon_high if epsilon_high is not None else (CISPO_EPSILON_HIGH if loss_type == "cispo" else epsilon)
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_N1 = advantages_N[:, None]
    if loss_type == "cispo":  # the clipped importance weight scales a REINFORCE term; its gradient flows in log pi
        per_token_NT = -torch.clamp(ratio_NT, max=high).detach() * adv_N1 * logp_NT
        bit_NT = (ratio_NT > high) & (adv_N1 > 0)
    else:
        clipped_NT = torch.clamp(ratio_NT, 1 - epsilon, 1 + high)
        per_token_NT = -torch.min(ratio_NT * adv_N1, clipped_NT * adv_N1)
        bit_NT = clipped_NT * adv_N1 < ratio_NT * adv_N1  # the clipped term is the smaller: clipping bit
    kl_NT = torch.zeros_like(logp_NT)
    if kl_beta:
        delta_NT = ref_logp_NT - logp_NT
        kl_NT = torch.exp(delta_NT) - delta_NT - 1
        per_token_NT = per_token_NT + kl_beta * (kl_NT * ratio_NT if kl_correction else kl_NT)
    mask_NT = mask_NT.to(per_token_NT.dtype)
    raw_N = mask_NT.sum(dim=1)
    tokens_N = raw_N.clamp(min=1)
    summed_N = (per_token_NT * mask_NT).sum(dim=1)
    if loss_type == "grpo":
        loss_N = summed_N / tokens_N
    elif loss_type == "dr_grpo":
        loss_N = summed_N / max_new_tokens
    elif loss_type in ("bnpo", "dapo", "cispo"):  # a token mean: these completions' (bnpo) or the step's
        step = mean_tokens is not None and loss_type != "bnpo"
        loss_N = summed_N / (max(mean_tokens, 1 / len(raw_N)) if step else raw_N.sum().clamp(min=1) / len(raw_N))
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    clip_N = (bit_NT.float() * mask_NT).sum(dim=1) / tokens_N
    return loss_N, (kl_NT.detach() * mask_NT).sum(dim=1) / tokens_N, clip_N


def token_logps(logits_NTV: torch.Tensor, targets_NT: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at the targets, in float32. [N, T]"""
    logp_NTV = torch.log_softmax(logits_NTV.float() / temperature, dim=-1)
    return logp_NTV.gather(-1, targets_NT[..., None])[..., 0]


@dataclass
class Rollouts:
    """One micro-batch's sampled completions and their rewards."""

    rows: list[Trajectory]  # prompt + completion (with tools: every turn and result), and what the model sampled
    totals: list[float]  # weighted reward
    parts: list[list[float]]  # each reward function's value
    repetitive: int  # completions that repeat a line or phrase (eval_tasks' measure)
    seconds: float  # spent sampling
    fresh: bool = True  # sampled for this step (False: updated on again, --num_iterations)
    old_logp_NT: torch.Tensor | None = None  # log-probs under the sampling policy (num_iterations > 1)
    lengths: tuple[int, int] | None = None  # the step's shortest and longest completion (on the first micro-batch)

    def to_dict(self) -> dict:
        """Plain data and a CPU tensor, for a checkpoint (loaded with weights_only)."""
        return {"rows": [row.to_dict() for row in self.rows], "totals": self.totals, "parts": self.parts,
                "repetitive": self.repetitive, "old_logp_NT": None if self.old_logp_NT is None else
                self.old_logp_NT.cpu(), "lengths": self.lengths}

    @classmethod
    def from_dict(cls, d: dict) -> Rollouts:
        """The rollouts to_dict() wrote, as a later step reuses them."""
        return cls([Trajectory.from_dict(row) for row in d["rows"]], d["totals"], d["parts"], d["repetitive"], 0.0,
                   False, d["old_logp_NT"], None if d["lengths"] is None else tuple(d["lengths"]))


class GRPO:
    """The GRPO objective on prompt batches (data/prompts.py): rollouts, rewards, advantages, clipped loss."""

    log_each_step = True  # metrics.jsonl gets every step's rewards, whatever --log_every (a noisy one-in-ten otherwise)

    def __init__(self, rewards: dict[str, tuple[RewardFn, float]], tokenizer: Tokenizer, group_size: int = 8,
                 temperature: float = 1.0, max_new_tokens: int = 128, epsilon: float = 0.2, loss_type: str = "grpo",
                 kl_beta: float = 0.0, reference: MiniLLM | None = None, epsilon_high: float | None = None,
                 scale_rewards: str = "group", kl_correction: bool = False, log_completions: int = 0,
                 tools: dict[str, Tool] | None = None, max_turns: int = 1, num_iterations: int = 1) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions of one prompt), got {group_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0: GRPO samples its completions, got {temperature}")
        if max_new_tokens < 1 or not 0 < epsilon < 1 or kl_beta < 0 or loss_type not in LOSS_TYPES:
            raise ValueError(f"need max_new_tokens >= 1, 0 < epsilon < 1, kl_beta >= 0 and loss_type in {LOSS_TYPES}; "
                             f"got {max_new_tokens}, {epsilon}, {kl_beta}, {loss_type!r}")
        if (epsilon_high is not None and not 0 < epsilon_high < math.inf) or scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"need epsilon_high > 0 (finite) and scale_rewards in {SCALE_REWARDS}; got {epsilon_high}, "
                             f"{scale_rewards!r}")
        if max_turns < 1 or num_iterations < 1:
            raise ValueError(f"max_turns and num_iterations must be >= 1, got {max_turns} and {num_iterations}")
        self.num_iterations = num_iterations  # updates per rollout; the loop repeats each batch this many steps
        self._rollouts: list[Rollouts] = []  # the last sampled step's, while later steps update on them again
        self._uses = 0  # steps since they were sampled, modulo num_iterations (0: the next step samples)
        self.epsilon_high, self.scale_rewards, self.kl_correction = epsilon_high, scale_rewards, kl_correction
        self.tools, self.max_turns = tools or {}, max_turns
        self.log_completions = int(log_completions)  # every N steps (0: never); the loop writes them
        self._pending: list[Rollouts] = []  # the step's rollouts, sampled by begin_step, in micro-batch order
        self._step_stats: tuple[float, float] | None = None  # (mean tokens, batch std) over the step
        self.rewards, self.tokenizer = rewards, tokenizer
        self.group_size, self.temperature, self.max_new_tokens = group_size, temperature, max_new_tokens
        self.epsilon, self.loss_type, self.kl_beta = epsilon, loss_type, kl_beta
        self.reference = Reference(reference)
        self.policy: MiniLLM | None = None
        self.stops = [*tokenizer.turn_end_ids, tokenizer.eos_id]
        self.metric_names = ("reward", *(f"rewards/{name}" for name in rewards), "frac_reward_zero_std", "clip_ratio",
                             "kl", "completions/mean_length", "completions/ended", "completions/clipped_ratio",
                             "completions/repetitive",
                             *(("tools/calls", "tools/errors", "tools/malformed") if self.tools else ()))

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Bind the policy that samples; with kl_beta, freeze the reference."""
        self.policy = model
        if self.kl_beta:
            self.reference.attach(model, device)

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The completions of the micro-batch: prompts x group_size."""
        return torch.tensor(float(batch[0].shape[0] * self.group_size), device=batch[0].device)

    def rollouts(self, prompts: list[list[int]]) -> list[list[Trajectory]]:
        """group_size completions of each prompt, all in flight together on the batched engine (infer/engine.py),
        each cut after its first stop token (which it keeps); with tools, trajectories of up to max_turns calling
        turns (infer/tool_rollouts.py)."""
        G = self.group_size
        if self.tools:
            rows = sample_with_tools(self.policy, self.tokenizer, prompts, G, self.max_new_tokens, self.temperature,
                                     self.tools, self.max_turns)
        else:
            completions = sample_groups(self.policy, prompts, G, self.max_new_tokens, self.temperature, self.stops)
            rows = [Trajectory.single(prompts[k // G], c) for k, c in enumerate(completions)]
        return [rows[i * G:(i + 1) * G] for i in range(len(prompts))]

    def score(self, request: str, row: Trajectory) -> tuple[float, list[float]]:
        """The weighted reward and each component's value for one completion: its last turn's text (with
        <|im_end|> when it closed the turn), its calls attached."""
        completion = row.answer
        ended = bool(completion) and completion[-1] in self.tokenizer.turn_end_ids
        text = self.tokenizer.decode(completion[:-1] if completion and completion[-1] in self.stops else completion)
        answer = ToolAnswer(text + ("<|im_end|>" if ended else ""), row.calls, row.results, row.malformed)
        values = []
        for name, (fn, _) in self.rewards.items():
            try:
                value = fn(request, answer)
                why = None if isinstance(value, numbers.Real) and math.isfinite(value) else f"returned {value!r}"
            except Exception as e:  # a user's reward function: its failure names it and the completion
                why = f"raised {type(e).__name__}: {e}"
            if why:
                raise RewardError(f"reward {name!r} {why} on the completion {str(answer)[:200]!r} (request "
                                  f"{request[:80]!r})")
            values.append(float(value))
        return sum(v * w for v, (_, w) in zip(values, self.rewards.values())), values

    def sample(self, micro: list[tuple[torch.Tensor, ...]]) -> list[Rollouts]:
        """Roll out the prompts of these micro-batches together, and score every completion; one Rollouts per
        micro-batch (the sampling time is counted in the first)."""
        prompts = [[row[mask > 0].tolist() for row, mask in zip(x_BT, m_BT)] for x_BT, _, m_BT in micro]
        start = time.perf_counter()
        groups = iter(self.rollouts([prompt for batch in prompts for prompt in batch]))
        seconds = time.perf_counter() - start
        outs = []
        for batch in prompts:
            out = Rollouts([], [], [], 0, 0.0 if outs else seconds)
            for prompt in batch:
                request = request_of(self.tokenizer.decode(prompt))
                for row in next(groups):
                    total, values = self.score(request, row)
                    out.repetitive += repeats(answer_body(self.tokenizer.decode(row.answer)))
                    out.rows.append(row)
                    out.totals.append(total)
                    out.parts.append(values)
            outs.append(out)
        return outs

    def begin_step(self, micro: list[tuple[torch.Tensor, ...]]) -> None:
        """Sample the whole step before its first backward: dapo and cispo divide by the step's completion tokens,
        scale_rewards "batch" by the std of the step's rewards (both over every process). With num_iterations > 1
        only every N-th step samples; the steps between update on its rollouts again (their prompts are the same)."""
        if self._uses == 0:
            self._rollouts = self.sample(micro)
            device = micro[0][0].device
            rewards = [r for out in self._rollouts for r in out.totals]
            lengths = [row.sampled_tokens for out in self._rollouts for row in out.rows]
            local = [len(rewards), sum(lengths), sum(rewards), sum(r * r for r in rewards)]
            n, tokens, total, squares = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()
            std = math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0
            self._step_stats = (tokens / n, std)
            longest, negated = all_reduce_max(torch.tensor([max(lengths), -min(lengths)], device=device)).tolist()
            self._rollouts[0].lengths = (-negated, longest)
            self._pending = list(self._rollouts)
        else:
            self._pending = [replace(out, seconds=0.0, fresh=False) for out in self._rollouts]
        self._uses = (self._uses + 1) % self.num_iterations

    def completion_batch(self, out: Rollouts, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, mask) of the rollouts' sequences. Learned: the tokens the model sampled (each turn's
        stop token included), never a tool's result."""
        return completion_batch([row.ids for row in out.rows], [row.sampled for row in out.rows],
                                self.tokenizer.pad_id, device)

    def state_dict(self) -> dict | None:
        """What a run resumed between the num_iterations updates of one rollout needs: the rollouts, their
        sampling log-probs and the step's statistics; None where the next step samples afresh."""
        if self._uses == 0:
            return None
        return {"uses": self._uses, "stats": list(self._step_stats), "rollouts": [r.to_dict() for r in self._rollouts]}

    def load_state_dict(self, state: dict | None) -> None:
        """Take back what state_dict() gave (None: the next step samples)."""
        self._uses = 0 if state is None else state["uses"]
        if state is not None:
            self._step_stats = tuple(state["stats"])
            self._rollouts = [Rollouts.from_dict(d) for d in state["rollouts"]]

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """The clipped policy-gradient loss of a micro-batch's rollouts (sampled now unless begin_step did)."""
        device, G = batch[0].device, self.group_size
        if self._pending:
            out, (mean_tokens, batch_std) = self._pending.pop(0), self._step_stats
        else:
            out, mean_tokens, batch_std = self.sample([batch])[0], None, None
            lengths = [row.sampled_tokens for row in out.rows]
            out.lengths = (min(lengths), max(lengths))
        rewards_BG = torch.tensor(out.totals, dtype=torch.float32, device=device).view(-1, G)
        std = None if batch_std is None else torch.tensor(batch_std, dtype=torch.float32, device=device)
        advantages_N = group_advantages(rewards_BG, self.scale_rewards, std).flatten()
        inputs_NT, targets_NT, mask_NT = self.completion_batch(out, device)
        logp_NT = token_logps(model(inputs_NT).logits, targets_NT, self.temperature)
        ref_NT = token_logps(self.reference.logits(inputs_NT), targets_NT, self.temperature) if self.kl_beta else None
        old_NT = logp_NT.detach() if out.old_logp_NT is None else out.old_logp_NT.to(device)
        if self.num_iterations > 1 and out.fresh:  # pi_old of the updates to come: no update has happened yet
            out.old_logp_NT = old_NT
        loss_N, kl_N, clip_N = sequence_losses(logp_NT, old_NT, advantages_N, mask_NT, self.epsilon,
                                               self.loss_type, self.max_new_tokens, ref_NT, self.kl_beta,
                                               self.epsilon_high, mean_tokens, self.kl_correction)
        parts_NK = torch.tensor(out.parts, dtype=torch.float32, device=device)
        degenerate_BG = (rewards_BG == rewards_BG[:, :1]).all(dim=1, keepdim=True).expand(-1, G)
        ended = float(sum(row.ids[-1] in self.tokenizer.turn_end_ids for row in out.rows))
        clipped = float(sum(not row.answer or row.answer[-1] not in self.stops for row in out.rows))
        metrics = {"reward": rewards_BG.sum(), **{f"rewards/{name}": parts_NK[:, k].sum()
                                                   for k, name in enumerate(self.rewards)},
                   "frac_reward_zero_std": degenerate_BG.float().sum(), "clip_ratio": clip_N.sum(), "kl": kl_N.sum(),
                   "completions/mean_length": mask_NT.sum(),
                   "completions/ended": torch.tensor(ended, device=device),
                   "completions/clipped_ratio": torch.tensor(clipped, device=device),
                   "completions/repetitive": torch.tensor(float(out.repetitive), device=device)}
        if self.tools:
            counts = {"tools/calls": sum(len(row.calls) for row in out.rows),
                      "tools/errors": sum(r.startswith("error:") for row in out.rows for r in row.results),
                      "tools/malformed": sum(row.malformed for row in out.rows)}
            metrics.update({name: torch.tensor(float(n), device=device) for name, n in counts.items()})
        counters = {"rollout_seconds": out.seconds, "rollout_tokens": float(mask_NT.sum()) if out.fresh else 0.0}
        if out.lengths is not None:  # the step's (every process's) shortest and longest completion, once
            counters.update({"completions/min_length": float(out.lengths[0]),
                             "completions/max_length": float(out.lengths[1])})
        samples = self.samples(out, advantages_N.tolist()) if self.log_completions and out.fresh else None
        return ObjectiveOutput(loss_N.mean(), metrics, tokens=inputs_NT.numel(), counters=counters, samples=samples)

    def samples(self, out: Rollouts, advantages: list[float]) -> list[dict]:
        """completions.jsonl's rows for these rollouts: the request, the completion's text, its rewards."""
        return [{"request": request_of(self.tokenizer.decode(row.ids[:row.prompt_length])),
                 "completion": self.tokenizer.decode(row.ids[row.prompt_length:]), "reward": total,
                 "rewards": dict(zip(self.rewards, parts)), "advantage": advantage}
                for row, total, parts, advantage in zip(out.rows, out.totals, out.parts, advantages)]
