"""What a training stage minimises: the one loop (trainer.py) takes an Objective, so a new stage is a new
objective and dataset, not a second loop.

An objective turns one micro-batch into the mean of a per-unit loss (per token for language modelling, per
pair for DPO) and says how many units it averaged over; the loop weights each micro-batch by its share of
the units of the whole global batch (all micro-batches, all processes), so the step's loss is the mean over
every unit whatever the accumulation or process count. Metrics come back as sums over the units and are
averaged the same way.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from minillm.model.model import MiniLLM
from minillm.model.moe import expert_load, load_balancing_loss


class ObjectiveOutput(NamedTuple):
    """One micro-batch's loss (a mean over its units) and its metrics (sums over its units, detached)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    tokens: int | None = None
    """Positions the forward pass ran over, when not the batch's input (GRPO's prompts + completions)."""
    counters: dict[str, float] | None = None
    """Amounts summed over the step's micro-batches on this process and logged as they are (GRPO: rollout
    seconds and tokens)."""
    samples: list[dict] | None = None
    """Rows for completions.jsonl (GRPO --log_completions: each prompt, completion and reward); rank 0's are
    written with the step."""


def completion_batch(sequences: list[list[int]], learned: list[list[tuple[int, int]]], pad_id: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion rows, right-padded, as (inputs, targets, mask): the mask learns the [start, end) spans
    `learned` gives for each sequence (what the model sampled: a completion, or a tool trajectory's turns without
    their tool results), never the prompt nor the padding (GRPO's rollouts, distillation's on-policy answers)."""
    T = max(map(len, sequences))
    ids_NT = torch.full((len(sequences), T), pad_id, dtype=torch.long, device=device)
    mask_NT = torch.zeros(len(sequences), T - 1, device=device)
    for i, (seq, spans) in enumerate(zip(sequences, learned)):
        ids_NT[i, :len(seq)] = torch.tensor(seq, device=device)
        for begin, end in spans:
            mask_NT[i, begin - 1:end - 1] = 1.0  # target position t predicts token t + 1
    return ids_NT[:, :-1], ids_NT[:, 1:], mask_NT


class Objective(Protocol):
    """The loss of a stage; the loop calls prepare once, then units and __call__ per micro-batch. An objective may
    also have begin_step(micro): called with the step's micro-batches before any of them (GRPO samples them all)."""

    metric_names: tuple[str, ...]
    """The metrics __call__ returns (sums over units), in the order they are logged."""

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """Ready what the objective needs besides the model (a reference model on the device, cached values)."""

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """How many units the micro-batch's loss is a mean over (a tensor, summed over processes)."""

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int) -> ObjectiveOutput:
        """The micro-batch's mean loss and metric sums; runs under the loop's autocast."""


class LanguageModeling:
    """Next-token cross-entropy over the learned tokens: pretraining and SFT.

    For a Mixture of Experts model the loss also holds router_aux_loss_coef x the load-balancing loss of each
    micro-batch (weighted like the micro-batch's tokens, so it is added once per step), and the metrics are
    that loss (moe/aux_loss) and the share of routing slots each expert got (moe/load_E), pooled over layers.
    """

    metric_names: tuple[str, ...] = ()
    _model: MiniLLM | None = None  # the plain model (the loop may wrap it), whose MoE layers keep their routing

    def prepare(self, model: MiniLLM, dataset: torch.utils.data.Dataset, device: torch.device,
                amp_dtype: torch.dtype) -> None:
        """The MoE metrics, when the model has experts."""
        experts = model.config.num_experts
        self.metric_names = ("moe/aux_loss", *(f"moe/load_{e}" for e in range(experts))) if experts else ()
        self._model = model if experts else None

    def units(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The learned tokens (loss_mask ones)."""
        return batch[2].sum()

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss_chunk: int = 0
                 ) -> ObjectiveOutput:
        """The token-mean cross-entropy of the micro-batch."""
        x_BT, y_BT, m_BT = batch
        loss = model(x_BT, labels=y_BT, loss_mask=m_BT, loss_chunk=loss_chunk).loss
        if self._model is None:
            return ObjectiveOutput(loss, {})
        with torch.no_grad():
            stats, units = self._model.router_stats(), m_BT.sum().float()
            values = [load_balancing_loss(stats, self._model.config.num_experts), *expert_load(stats)]
        return ObjectiveOutput(loss, {name: v * units for name, v in zip(self.metric_names, values)})
