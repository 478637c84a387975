"""The training loss: token-weighted cross-entropy, whole or in chunks over the sequence.

Both forms weight each token by (label != -100) x loss_mask and divide by the count of such tokens, so a
batch's loss is the mean over the tokens that are learned (SFT answers, not prompts or padding).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _token_weights(labels_BT: torch.Tensor, loss_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """1.0 where a token counts in the loss (label != -100 and the mask set), else 0.0; float32."""
    weight_BT = (labels_BT != -100).float()
    return weight_BT if loss_mask_BT is None else weight_BT * loss_mask_BT.float()


def _weighted_nll_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, weight_BT: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of weight x cross-entropy."""
    nll = F.cross_entropy(logits_BTV.flatten(0, 1), labels_BT.flatten(), ignore_index=-100, reduction="none")
    return (nll * weight_BT.flatten().to(nll.dtype)).sum()


def masked_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                         loss_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token cross-entropies where the mask is set (and label != -100), over the count of such tokens."""
    weight_BT = _token_weights(labels_BT, loss_mask_BT)
    # A batch with nothing to learn (e.g. SFT answers cut off) gives 0, not NaN.
    return _weighted_nll_sum(logits_BTV, labels_BT, weight_BT) / weight_BT.sum().clamp(min=1.0)


def chunked_cross_entropy(head: nn.Module, h_BTC: torch.Tensor, labels_BT: torch.Tensor,
                          loss_mask_BT: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """masked_cross_entropy(head(h), ...) with the logits made `chunk` positions at a time.

    Each chunk's logits are checkpointed: backward recomputes them one chunk at a time, so memory holds
    [B, chunk, V] logits instead of [B, T, V] (2 GB in float32 for a 32k vocabulary at 16 x 1024).
    """
    weight_BT = _token_weights(labels_BT, loss_mask_BT)
    total = h_BTC.new_zeros((), dtype=torch.float32)
    for t in range(0, h_BTC.shape[1], chunk):
        part = slice(t, t + chunk)
        total = total + checkpoint(lambda h, y, w: _weighted_nll_sum(head(h), y, w), h_BTC[:, part],
                                   labels_BT[:, part], weight_BT[:, part], use_reentrant=False)
    return total / weight_BT.sum().clamp(min=1.0)
