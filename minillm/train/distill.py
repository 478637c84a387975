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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minillm.model.model import MiniLLM
from minillm.train.objective import ObjectiveOutput
from minillm.train.reference import Reference


def generalized_jsd(student_NV: torch.Tensor, teacher_NV: torch.Tensor, beta: float, temperature: float
                    ) -> torch.Tensor:
    """Per row, the generalized JSD between the teacher's and the student's distributions at `temperature`. [N]"""
    log_q = torch.log_softmax(student_NV.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_NV.float() / temperature, dim=-1)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # KL(a || b) per row, 0 log 0 = 0
        return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


class Distillation:
    """Offline distillation: on each micro-batch's learned tokens, alpha x the generalized JSD to the teacher plus
    (1 - alpha) x the cross-entropy to the labels. Metrics: distill/divergence and distill/ce (token means)."""

    metric_names = ("distill/divergence", "distill/ce")

    def __init__(self, teacher: MiniLLM, alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0) -> None:
        if not (0 <= alpha <= 1 and 0 <= beta <= 1 and 0 < temperature < math.inf):
            raise ValueError(f"need 0 <= alpha <= 1, 0 <= beta <= 1 and temperature > 0; got {alpha}, {beta}, "
                             f"{temperature}")
        self.teacher = Reference(teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Freeze the teacher on the device."""
        self.teacher.attach(model, device)

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The learned tokens (loss_mask ones)."""
        return batch[2].sum()

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """The micro-batch's token mean of the mixed loss, and the sums of its two parts."""
        x_BT, y_BT, m_BT = batch
        learned = m_BT > 0
        student_NV = model(x_BT).logits[learned]
        V = student_NV.shape[-1]
        teacher_NV = self.teacher.logits(x_BT)[learned][:, :V]  # a teacher may pad its vocabulary
        divergence_N = generalized_jsd(student_NV, teacher_NV, self.beta, self.temperature)
        ce_N = F.cross_entropy(student_NV.float(), y_BT[learned], reduction="none")
        loss = (self.alpha * divergence_N + (1 - self.alpha) * ce_N).sum() / max(int(learned.sum()), 1)
        metrics = {"distill/divergence": divergence_N.detach().sum(), "distill/ce": ce_N.detach().sum()}
        return ObjectiveOutput(loss, metrics)
