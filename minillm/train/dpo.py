"""Direct Preference Optimization (Rafailov et al., 2023) as an objective of the one training loop.

For a prompt x with a chosen response y_w and a rejected one y_l, with log-probs summed over each response's
tokens (not averaged) under the policy pi and a frozen reference:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

The implicit rewards beta * (log pi - log ref) are logged as TRL logs them (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected), averaged over the pairs of a step.
The reference is a second frozen model, or, when the policy carries LoRA adapters, the policy itself with its
adapters switched off (no second copy); its log-probs are computed beside the policy's in the same autocast,
or once before training (precompute), which gives the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from minillm.data.datasets import trim_padding
from minillm.model.model import MiniLLM
from minillm.train.objective import ObjectiveOutput
from minillm.train.reference import Reference

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def sequence_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(label) over the masked positions; the log-softmax in float32. [B]"""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    logp_BT = logp_BTV.gather(-1, labels_BT.unsqueeze(-1)).squeeze(-1)
    return (logp_BT * mask_BT.float()).sum(dim=-1)


def dpo_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (the sigmoid DPO loss, the chosen reward, the rejected reward); rewards detached."""
    chosen_ratio_B, rejected_ratio_B = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    loss_B = -F.logsigmoid(beta * (chosen_ratio_B - rejected_ratio_B))
    return loss_B, beta * chosen_ratio_B.detach(), beta * rejected_ratio_B.detach()


class DPO:
    """The DPO objective on [B, 2, T] preference batches (data/preference.py): one forward for both responses."""

    metric_names = DPO_METRICS

    def __init__(self, beta: float = 0.1, reference: MiniLLM | None = None, precompute: bool = False,
                 batch_size: int = 16, verbose: bool = False) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.precompute = beta, precompute
        self.reference: Reference | None = Reference(reference)
        self.batch_size, self.verbose = batch_size, verbose

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Freeze the reference on the device; with precompute, store its log-probs in the dataset."""
        self.reference.attach(model, device)
        if self.precompute:
            dataset.reference_logps = None  # the dataset yields (X, Y, mask) while they are computed
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
            parts = []
            for batch in tqdm(loader, desc="reference log-probs", unit="batch", disable=not self.verbose):
                x_B2T, y_B2T, m_B2T = (t.to(device) for t in trim_padding(*batch))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    parts.append(self.reference_logps(x_B2T, y_B2T, m_B2T).cpu())
            dataset.reference_logps = torch.cat(parts)
            self.reference = None  # every batch now carries its reference log-probs: the model can go

    def reference_logps(self, x_B2T: torch.Tensor, y_B2T: torch.Tensor, m_B2T: torch.Tensor) -> torch.Tensor:
        """The reference's summed response log-probs, [B, 2] (chosen, rejected); no gradient, no dropout."""
        logits = self.reference.logits(x_B2T.flatten(0, 1))
        return sequence_logps(logits, y_B2T.flatten(0, 1), m_B2T.flatten(0, 1)).view(-1, 2)

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The pairs in the micro-batch."""
        return torch.tensor(float(batch[0].shape[0]), device=batch[0].device)

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """The pair-mean DPO loss and the metric sums of a [B, 2, T] micro-batch."""
        x_B2T, y_B2T, m_B2T = batch[:3]
        logits = model(x_B2T.flatten(0, 1)).logits
        logps_B2 = sequence_logps(logits, y_B2T.flatten(0, 1), m_B2T.flatten(0, 1)).view(-1, 2)
        ref_B2 = batch[3] if len(batch) > 3 else self.reference_logps(x_B2T, y_B2T, m_B2T)
        loss_B, chosen_B, rejected_B = dpo_loss(logps_B2[:, 0], logps_B2[:, 1], ref_B2[:, 0], ref_B2[:, 1], self.beta)
        logps_B2 = logps_B2.detach()
        metrics = {"rewards/chosen": chosen_B.sum(), "rewards/rejected": rejected_B.sum(),
                   "rewards/margins": (chosen_B - rejected_B).sum(),
                   "rewards/accuracies": (chosen_B > rejected_B).float().sum(),
                   "logps/chosen": logps_B2[:, 0].sum(), "logps/rejected": logps_B2[:, 1].sum()}
        return ObjectiveOutput(loss_B.mean(), metrics)
