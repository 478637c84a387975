"""Which device and which dtype: the --device and --dtype rules every script and the trainer share.

Training may compute in bf16 where the hardware has it (`resolve_dtype`); anything that reports a number or
shows text defaults to float32 on CPUs (`inference_dtype`), so results never depend on the machine.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


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


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (free GPU memory; MemAvailable on Linux), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


def _cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field (Linux), None where there is none."""
    try:
        found = re.search(rf"^{field}\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return None
    return found.group(1).strip() if found else None


def threaded_blas_gemv() -> bool:
    """True when torch's one-row float product (BLAS GEMV) reads the weights with every core: MKL on Intel CPUs.

    On AMD CPUs MKL's GEMV reads at one core's bandwidth, and the decode step's products run 3x faster as
    reductions that inductor splits over the cores; on an Intel Xeon MKL's GEMV read at the memory's speed,
    1.4x faster than those reductions (bench/RESULTS.md, "Decoding against llama.cpp"). model/linear.py picks
    by this. MINILLM_BLAS_GEMV=0/1 overrides the check (tests; a CPU it gets wrong).
    """
    forced = os.environ.get("MINILLM_BLAS_GEMV")
    if forced in ("0", "1"):
        return forced == "1"
    return torch.backends.mkl.is_available() and _cpuinfo("vendor_id") == "GenuineIntel"


def cpu_flags() -> str:
    """The CPU flags that decide float32 and bf16 speed (avx2, avx512f, avx512_bf16, amx_*), as lscpu shows them."""
    listed = _cpuinfo("flags")
    if listed is None:
        return "flags unknown"
    flags = set(listed.split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags] + sorted(f for f in flags if f.startswith("amx"))
    return " ".join(wanted) or "no avx2"


def describe_machine(device: torch.device) -> str:
    """One line naming where a run computes: the GPU, or the CPU model with its flags, threads and cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible)"
    model = _cpuinfo("model name") or platform.processor() or "cpu"
    return f"{model} ({cpu_flags()}), {torch.get_num_threads()} threads of {os.cpu_count()} cores"
