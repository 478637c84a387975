"""The one training loop every stage shares: TrainConfig, the step, the objectives (language modelling, DPO),
schedule, optimizers, checkpoints that resume exactly, progress and metrics, torchrun processes (DDP, FSDP2)
and the launcher.

May import: minillm.eval, minillm.infer, minillm.export, minillm.model, minillm.data, minillm.files, minillm.device.
`from minillm.train import TrainConfig, train` is the stable way in (minillm itself does not import training).
"""

from minillm.train.config import TrainConfig, TrainResult
from minillm.train.dpo import DPO
from minillm.train.objective import LanguageModeling, Objective
from minillm.train.trainer import train

__all__ = ["DPO", "LanguageModeling", "Objective", "TrainConfig", "TrainResult", "train"]
