"""torchrun environment, process-group setup and teardown, and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is running."""
        return self.world_size > 1


def resolve_device(device: str | None = None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16), as oneDNN uses.

    MINILLM_NATIVE_BF16=0/1 overrides the detection (tests; a CPU the check gets wrong).
    """
    forced = os.environ.get("MINILLM_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype value on this device: auto is bfloat16 on GPUs that support it (else float16), and on CPUs
    with native bf16 matrix units; float32 on other CPUs (which emulate bf16, slower than float32)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """A generate/serve --dtype value: auto is the GPU's half dtype, and float32 on every CPU, so that greedy
    text (and llama.cpp's f32 run of the same GGUF) does not change with the CPU's bf16 units."""
    return torch.float32 if name == "auto" and device.type != "cuda" else resolve_dtype(name, device)


def dtype_reason(name: str, device: torch.device) -> str:
    """What --dtype NAME means on this device, and why, for a run's first lines."""
    dtype = str(resolve_dtype(name, device)).removeprefix("torch.")
    if name != "auto":
        return f"{dtype} (--dtype)"
    if device.type == "cuda":
        return f"{dtype} (auto: {'the GPU supports bf16' if dtype == 'bfloat16' else 'no bf16 on this GPU'})"
    return f"{dtype} (auto: {'the CPU has' if dtype == 'bfloat16' else 'no'} native bf16 matrix units)"


def setup_distributed(device: str | None = None) -> DistEnv:
    """Read RANK/LOCAL_RANK/WORLD_SIZE set by torchrun and join the process group (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown_distributed() -> None:
    """Destroy the process group if one is running."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
