"""The frozen reference model that DPO and GRPO's KL term compare the policy with.

Either a second model (eval mode, no gradient), or, when the policy carries LoRA adapters and no other
reference is given, the policy itself with its adapters switched off: the base model, without a second copy.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from minillm.model.lora import adapters_disabled, has_lora
from minillm.model.model import MiniLLM


class Reference:
    """Logits of the frozen reference: `model`, or the LoRA policy with adapters off (model None)."""

    def __init__(self, model: MiniLLM | None = None) -> None:
        self.model = model
        self.policy: MiniLLM | None = None

    def attach(self, policy: MiniLLM, device: torch.device) -> None:
        """Bind the (unwrapped) policy and freeze the reference model on the device."""
        if self.model is None and not has_lora(policy):
            raise ValueError("a reference model is needed: pass one, or train LoRA adapters (the reference is then "
                             "the base model with the adapters off)")
        self.policy = policy
        if self.model is not None:
            self.model.to(device).eval().requires_grad_(False)

    def logits(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits, without gradient or dropout; the policy's training mode is restored after."""
        model = self.model if self.model is not None else self.policy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), adapters_disabled(model) if self.model is None else nullcontext():
                return model(input_ids_BT).logits
        finally:
            model.train(was_training)
