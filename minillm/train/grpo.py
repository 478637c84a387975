"""GRPO (Shao et al., 2024) with verifiable rewards, as an objective of the one training loop.

Per micro-batch of prompts: G completions per prompt are sampled from the current policy (KV cache, batched
per prompt, at `temperature`), scored by reward functions (request, answer) -> float (eval/rewards.py), and
each completion's advantage is its reward standardised within its group, A = (r - mean) / (std + 1e-4),
with the unbiased std of the G rewards (TRL's default); a group whose rewards are all equal has A = 0 and
gives no gradient (counted in frac_reward_zero_std). The loss per completion token t of completion i is

    -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon) * A_i) + kl_beta * KL_t,
    ratio = pi(o_t) / pi_old(o_t),  KL_t = exp(ref - logp) - (ref - logp) - 1   (the k3 estimator)

over the completion up to and including its <|im_end|>, with log-probs of the logits / temperature in float32.
One update per rollout: pi_old is the same forward detached, so the ratio is exactly 1 and the gradient is
REINFORCE's with advantage A_i / |o_i| (loss_type grpo) or A_i / max_new_tokens (dr_grpo). loss_type grpo
averages each completion's tokens, then the completions (the paper's); dr_grpo sums each completion's tokens
and divides by max_new_tokens (Dr. GRPO), so long and short completions weigh by their tokens. Either way
the step's loss is a mean over its completions, whatever the accumulation or process count; sampling draws
from the run's RNG, which checkpoints save, so a resumed run samples the same completions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from minillm.data.prompts import request_of
from minillm.data.tokenizer import Tokenizer
from minillm.eval.heldout import repeats
from minillm.eval.tasks import answer_body
from minillm.infer.generation import generate
from minillm.model.model import MiniLLM
from minillm.train.objective import ObjectiveOutput
from minillm.train.reference import Reference

LOSS_TYPES = ("grpo", "dr_grpo")
RewardFn = Callable[[str, str], float]


def group_advantages(rewards_BG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps), std unbiased over the G completions of a prompt. [B, G]"""
    return (rewards_BG - rewards_BG.mean(dim=1, keepdim=True)) / (rewards_BG.std(dim=1, keepdim=True) + eps)


def sequence_losses(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, advantages_N: torch.Tensor,
                    mask_NT: torch.Tensor, epsilon: float, loss_type: str, max_new_tokens: int,
                    ref_logp_NT: torch.Tensor | None = None, kl_beta: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion: (its loss, its mean token KL, the fraction of its tokens where clipping bit); [N] each."""
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_N1 = advantages_N[:, None]
    clipped_NT = torch.clamp(ratio_NT, 1 - epsilon, 1 + epsilon)
    per_token_NT = -torch.min(ratio_NT * adv_N1, clipped_NT * adv_N1)
    kl_NT = torch.zeros_like(logp_NT)
    if kl_beta:
        delta_NT = ref_logp_NT - logp_NT
        kl_NT = torch.exp(delta_NT) - delta_NT - 1
        per_token_NT = per_token_NT + kl_beta * kl_NT
    mask_NT = mask_NT.to(per_token_NT.dtype)
    tokens_N = mask_NT.sum(dim=1).clamp(min=1)
    summed_N = (per_token_NT * mask_NT).sum(dim=1)
    if loss_type == "grpo":
        loss_N = summed_N / tokens_N
    elif loss_type == "dr_grpo":
        loss_N = summed_N / max_new_tokens
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    bit_NT = clipped_NT * adv_N1 < ratio_NT * adv_N1  # the clipped term is the smaller: clipping bit
    clip_N = (bit_NT.float() * mask_NT).sum(dim=1) / tokens_N
    return loss_N, (kl_NT.detach() * mask_NT).sum(dim=1) / tokens_N, clip_N


def token_logps(logits_NTV: torch.Tensor, targets_NT: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at the targets, in float32. [N, T]"""
    logp_NTV = torch.log_softmax(logits_NTV.float() / temperature, dim=-1)
    return logp_NTV.gather(-1, targets_NT[..., None])[..., 0]


class GRPO:
    """The GRPO objective on prompt batches (data/prompts.py): rollouts, rewards, advantages, clipped loss."""

    def __init__(self, rewards: dict[str, tuple[RewardFn, float]], tokenizer: Tokenizer, group_size: int = 8,
                 temperature: float = 1.0, max_new_tokens: int = 128, epsilon: float = 0.2, loss_type: str = "grpo",
                 kl_beta: float = 0.0, reference: MiniLLM | None = None) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions of one prompt), got {group_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0: GRPO samples its completions, got {temperature}")
        if max_new_tokens < 1 or not 0 < epsilon < 1 or kl_beta < 0 or loss_type not in LOSS_TYPES:
            raise ValueError(f"need max_new_tokens >= 1, 0 < epsilon < 1, kl_beta >= 0 and loss_type in {LOSS_TYPES}; "
                             f"got {max_new_tokens}, {epsilon}, {kl_beta}, {loss_type!r}")
        self.rewards, self.tokenizer = rewards, tokenizer
        self.group_size, self.temperature, self.max_new_tokens = group_size, temperature, max_new_tokens
        self.epsilon, self.loss_type, self.kl_beta = epsilon, loss_type, kl_beta
        self.reference = Reference(reference)
        self.policy: MiniLLM | None = None
        self.stops = [*tokenizer.turn_end_ids, tokenizer.eos_id]
        self.metric_names = ("reward", *(f"rewards/{name}" for name in rewards), "frac_reward_zero_std", "clip_ratio",
                             "kl", "completions/mean_length", "completions/ended", "completions/repetitive")

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Bind the policy that samples; with kl_beta, freeze the reference."""
        self.policy = model
        if self.kl_beta:
            self.reference.attach(model, device)

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The completions of the micro-batch: prompts x group_size."""
        return torch.tensor(float(batch[0].shape[0] * self.group_size), device=batch[0].device)

    def rollout(self, prompt: list[int]) -> list[list[int]]:
        """group_size completions of one prompt, each cut after its first stop token (which it keeps)."""
        out = generate(self.policy, [prompt] * self.group_size, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, eos_token_id=self.stops)
        completions = []
        for row in out[:, len(prompt):].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stops), len(row))
            completions.append(row[:end])
        return completions

    def score(self, request: str, completion: list[int]) -> tuple[float, list[float]]:
        """The weighted reward and each component's value for one completion."""
        ended = bool(completion) and completion[-1] in self.tokenizer.turn_end_ids
        answer = self.tokenizer.decode(completion[:-1] if completion and completion[-1] in self.stops else completion)
        values = [fn(request, answer + ("<|im_end|>" if ended else "")) for fn, _ in self.rewards.values()]
        return sum(v * w for v, (_, w) in zip(values, self.rewards.values())), values

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """Sample, score and take the clipped policy-gradient loss of a micro-batch of prompts."""
        x_BT, _, m_BT = batch
        device, G = x_BT.device, self.group_size
        prompts = [row[mask > 0].tolist() for row, mask in zip(x_BT, m_BT)]
        sequences, completions, totals, parts, repetitive = [], [], [], [], 0
        rollout_seconds = 0.0
        for prompt in prompts:
            request = request_of(self.tokenizer.decode(prompt))
            start = time.perf_counter()
            rollouts = self.rollout(prompt)
            rollout_seconds += time.perf_counter() - start
            for completion in rollouts:
                total, values = self.score(request, completion)
                repetitive += repeats(answer_body(self.tokenizer.decode(completion)))  # eval_tasks' measure
                sequences.append(prompt + completion)
                completions.append((len(prompt), len(completion)))
                totals.append(total)
                parts.append(values)
        rewards_BG = torch.tensor(totals, dtype=torch.float32, device=device).view(-1, G)
        advantages_N = group_advantages(rewards_BG).flatten()
        # Prompt + completion, right-padded; learned: the completion's tokens (its stop token included).
        T = max(map(len, sequences))
        ids_NT = torch.full((len(sequences), T), self.tokenizer.pad_id, dtype=torch.long, device=device)
        mask_NT = torch.zeros(len(sequences), T - 1, device=device)
        for i, (seq, (start, n)) in enumerate(zip(sequences, completions)):
            ids_NT[i, :len(seq)] = torch.tensor(seq, device=device)
            mask_NT[i, start - 1:start - 1 + n] = 1.0
        inputs_NT, targets_NT = ids_NT[:, :-1], ids_NT[:, 1:]
        logp_NT = token_logps(model(inputs_NT).logits, targets_NT, self.temperature)
        ref_NT = token_logps(self.reference.logits(inputs_NT), targets_NT, self.temperature) if self.kl_beta else None
        loss_N, kl_N, clip_N = sequence_losses(logp_NT, logp_NT.detach(), advantages_N, mask_NT, self.epsilon,
                                               self.loss_type, self.max_new_tokens, ref_NT, self.kl_beta)
        parts_NK = torch.tensor(parts, dtype=torch.float32, device=device)
        degenerate_BG = (rewards_BG == rewards_BG[:, :1]).all(dim=1, keepdim=True).expand(-1, G)
        metrics = {"reward": rewards_BG.sum(), **{f"rewards/{name}": parts_NK[:, k].sum()
                                                   for k, name in enumerate(self.rewards)},
                   "frac_reward_zero_std": degenerate_BG.float().sum(), "clip_ratio": clip_N.sum(), "kl": kl_N.sum(),
                   "completions/mean_length": mask_NT.sum(),
                   "completions/ended": torch.tensor(float(sum(s[-1] in self.tokenizer.turn_end_ids for s in sequences)),
                                                     device=device),
                   "completions/repetitive": torch.tensor(float(repetitive), device=device)}
        counters = {"rollout_seconds": rollout_seconds, "rollout_tokens": float(sum(n for _, n in completions))}
        return ObjectiveOutput(loss_N.mean(), metrics, tokens=inputs_NT.numel(), counters=counters)
