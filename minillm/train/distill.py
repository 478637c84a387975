"""Knowledge distillation as an objective of the one training loop: a frozen teacher's next-token distribution
teaches the student, on dataset text (offline; Hinton et al. 2015) with the generalized Jensen-Shannon divergence
of GKD (Agarwal et al. 2024, eq. 1), mixed with the usual cross-entropy:

    loss = alpha * JSD_beta(teacher || student at temperature T) + (1 - alpha) * CE(student, labels)

with, per token and over the vocabulary, p = softmax(teacher / T), q = softmax(student / T) and
m = beta * p + (1 - beta) * q:

    JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)      (0 < beta < 1)
    beta = 0: KL(p || q), the forward KL;   beta = 1: KL(q || p), the reverse KL

averaged over the learned tokens (the loss mask), as TRL's GKDTrainer.generalized_jsd_loss does (tested equal).
The teacher shares the student's tokenizer, runs under no_grad in eval mode, and is never in the optimizer or the
checkpoint.

On-policy (GKD's lmbda): with probability lmbda a micro-batch of chats has its answers replaced by the student's
own, sampled on the batched engine (infer/engine.py) from each row's prompt (the tokens before its first learned
one); the teacher scores them and the loss is the divergence alone over the sampled tokens (they have no reference
answer for a cross-entropy). The draw uses torch's RNG, which checkpoints save, so a resumed run draws the same.

With a top-k cache (topk; train/teacher_cache.py), the dataset's teacher distribution is computed once
before training, kept as each position's k likeliest ids with the rest of the mass spread evenly, and read from
disk every epoch instead of running the teacher; on-policy batches still run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minillm.infer.engine import sample_groups
from minillm.model.model import MiniLLM
from minillm.train.distributed import barrier
from minillm.train.objective import ObjectiveOutput, completion_batch
from minillm.train.reference import Reference
from minillm.train.teacher_cache import TeacherCache, build_or_load


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities, 0 log 0 = 0."""
    return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_b), 0.0).sum(-1)


ROWS = 64  # rows per chunk: a chunk's [rows, V] temporaries stay in cache (3.7x faster at V = 6,404 than whole)


def _pieces(student_RV: torch.Tensor, teacher_RV: torch.Tensor, beta: float, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(divergence per row, log q, the pull on q that backward needs) for a chunk of rows."""
    log_q = torch.log_softmax(student_RV.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_RV.float() / temperature, dim=-1)
    if beta == 0:
        return _kl(log_p, log_q), log_q, log_p
    if beta == 1:
        value, pull = _kl(log_q, log_p), log_q - log_p
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        value = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
        pull = (1 - beta) * (log_q - log_m)
    return value, log_q, torch.where(log_q > -math.inf, pull, 0.0)  # q = 0 pulls nothing


class _GeneralizedJSD(torch.autograd.Function):
    """The divergence by chunks of rows, with its gradient written out and recomputed chunk by chunk in backward:
    no [N, V] temporary is kept (autograd's way cost more than the default 4.6M student's own forward and backward
    and held a dozen of them).

    With m = beta p + (1 - beta) q: JSD = H(m) - beta H(p) - (1 - beta) H(q), so dJSD/dq_i = (1 - beta)(log q_i -
    log m_i); KL(q || p) gives log q_i - log p_i. Through the softmax of z / T, a pull g on q becomes
    q * (g - sum(q g)) / T on the student's logits z. KL(p || q) gives (q - p) / T directly."""

    @staticmethod
    def forward(ctx, student_NV: torch.Tensor, teacher_NV: torch.Tensor, beta: float, temperature: float
                ) -> torch.Tensor:
        ctx.save_for_backward(student_NV, teacher_NV)
        ctx.beta, ctx.temperature = beta, temperature
        N = student_NV.shape[0]
        values = [_pieces(student_NV[a:a + ROWS], teacher_NV[a:a + ROWS], beta, temperature)[0] for a in range(0, N, ROWS)]
        return torch.cat(values) if values else student_NV.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        student_NV, teacher_NV = ctx.saved_tensors
        grad_NV = torch.empty_like(student_NV)
        for a in range(0, student_NV.shape[0], ROWS):
            b = a + ROWS
            _, log_q, pull = _pieces(student_NV[a:b], teacher_NV[a:b], ctx.beta, ctx.temperature)
            q = log_q.exp()
            grad = q - pull.exp() if ctx.beta == 0 else q * (pull - (q * pull).sum(-1, keepdim=True))
            grad_NV[a:b] = grad * (grad_N[a:b, None] / ctx.temperature)
        return grad_NV, None, None, None


def generalized_jsd(student_NV: torch.Tensor, teacher_NV: torch.Tensor, beta: float, temperature: float
                    ) -> torch.Tensor:
    """Per row, the generalized JSD between the teacher's and the student's distributions at `temperature`; the
    gradient flows to the student's logits only (the teacher is frozen). [N]"""
    return _GeneralizedJSD.apply(student_NV, teacher_NV.detach(), beta, temperature)


class Distillation:
    """Offline distillation: on each micro-batch's learned tokens, alpha x the generalized JSD to the teacher plus
    (1 - alpha) x the cross-entropy to the labels. Metrics: distill/divergence and distill/ce (token means)."""

    metric_names = ("distill/divergence", "distill/ce")

    def __init__(self, teacher: MiniLLM, alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                 lmbda: float = 0.0, max_new_tokens: int = 128, stop_ids: Sequence[int] = (),
                 topk: int | None = None, cache_dir: str | Path | None = None, verbose: bool = True) -> None:
        if not (0 <= alpha <= 1 and 0 <= beta <= 1 and 0 < temperature < math.inf and 0 <= lmbda <= 1
                and max_new_tokens >= 1):
            raise ValueError(f"need 0 <= alpha, beta, lmbda <= 1, temperature > 0 and max_new_tokens >= 1; got {alpha}, "
                             f"{beta}, {lmbda}, {temperature}, {max_new_tokens}")
        if topk is not None and (topk < 1 or cache_dir is None):
            raise ValueError(f"a teacher cache needs topk >= 1 and a folder; got {topk}, {cache_dir}")
        self.topk, self.cache_dir, self.verbose = topk, cache_dir, verbose
        self.cache: TeacherCache | None = None
        self.teacher = Reference(teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.lmbda, self.max_new_tokens, self.stop_ids = lmbda, max_new_tokens, list(stop_ids)
        self.student: MiniLLM | None = None
        self._replaced: dict[int, tuple[torch.Tensor, ...]] = {}  # this step's on-policy micro-batches, by id

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Freeze the teacher on the device; keep the (unwrapped) student, which samples on-policy batches; with
        topk, open the dataset's teacher cache, the first process building it if needed."""
        self.teacher.attach(model, device)
        self.student = model
        if self.topk is not None:
            first = not dist.is_initialized() or dist.get_rank() == 0
            if not first:
                barrier()  # the first process builds (or checks) the cache, then the others open it
            self.cache = build_or_load(self.teacher, dataset, Path(self.cache_dir), self.topk, self.temperature,
                                       model.config.vocab_size, device, verbose=self.verbose and first)
            if first:
                barrier()

    def on_policy(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The batch with each row's answer replaced by the student's sample from the row's prompt: (x, y, mask)
        right-padded, the mask over the sampled tokens."""
        x_BT, _, m_BT = batch
        prompts = []
        for x_T, m_T in zip(x_BT.tolist(), m_BT.tolist()):
            first = next((t for t, m in enumerate(m_T) if m > 0), len(m_T) - 1)  # x[first] predicts the answer
            prompts.append(x_T[:first + 1])
        answers = sample_groups(self.student, prompts, 1, self.max_new_tokens, self.temperature, self.stop_ids)
        # Padding is never learned nor attended to by a learned position (causal), so any id pads.
        return completion_batch([p + a for p, a in zip(prompts, answers)],
                                [[(len(p), len(p) + len(a))] for p, a in zip(prompts, answers)], 0, x_BT.device)

    def begin_step(self, micro: list[tuple[torch.Tensor, ...]]) -> None:
        """Draw which micro-batches go on-policy and sample their answers now, so that the step weighs every
        micro-batch by the tokens it really learns (units)."""
        self._replaced = {}
        for batch in micro:
            if self.lmbda > 0 and float(torch.rand(())) < self.lmbda:
                self._replaced[id(batch)] = self.on_policy(batch)

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The learned tokens (loss_mask ones; of the sampled answers for an on-policy micro-batch)."""
        return self._replaced.get(id(batch), batch)[2].sum()

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """The micro-batch's token mean of the mixed loss, and the sums of its two parts."""
        on_policy = id(batch) in self._replaced
        x_BT, y_BT, m_BT = self._replaced.get(id(batch), batch)
        learned = m_BT > 0
        student_NV = model(x_BT).logits[learned]
        V = student_NV.shape[-1]
        if self.cache is not None and not on_policy:  # log p scaled by T: the divergence's softmax(. / T) is p
            teacher_NV = self.cache.log_probs(x_BT, m_BT) * self.temperature
        else:
            teacher_NV = self.teacher.logits(x_BT)[learned][:, :V]  # a teacher may pad its vocabulary
        divergence_N = generalized_jsd(student_NV, teacher_NV, self.beta, self.temperature)
        ce_N = F.cross_entropy(student_NV.float(), y_BT[learned], reduction="none")
        alpha = 1.0 if on_policy else self.alpha  # the student's own tokens have no reference answer
        loss = (alpha * divergence_N + (1 - alpha) * ce_N).sum() / max(int(learned.sum()), 1)
        metrics = {"distill/divergence": divergence_N.detach().sum(), "distill/ce": ce_N.detach().sum()}
        return ObjectiveOutput(loss, metrics, tokens=x_BT.numel(), counters={"on_policy_batches": float(on_policy)})
