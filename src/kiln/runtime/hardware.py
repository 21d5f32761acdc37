"""What this machine is: CPU vendor, ISA flags that matter for INT8/fp16, cores, ORT providers, GPU."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "f16c",
)


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
            break
    return model, flags


@functools.lru_cache(maxsize=1)
def probe() -> dict[str, Any]:
    """A JSON-ready description of the hardware, recorded in every manifest and report.

    ``int8_fast`` is true only where the CPU has VNNI or AMX integer dot products; on plain AVX2 INT8 may or may
    not pay, which is why the optimizer measures instead of assuming.
    """
    import onnxruntime as ort

    model, flags = _cpuinfo()
    isa = {flag: flag in flags for flag in _ISA_FLAGS}
    providers = list(ort.get_available_providers())
    cuda = "CUDAExecutionProvider" in providers and _cuda_device_present()
    return {
        "cpu": model,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        "isa": isa,
        "int8_fast": isa["avx512_vnni"] or isa["avx_vnni"] or isa["amx_int8"],
        "ort_providers": providers,
        "gpu": cuda,
        "onnxruntime": ort.__version__,
    }


def _cuda_device_present() -> bool:
    """Whether an NVIDIA device is usable, without importing torch when nothing has yet (that costs seconds,
    and ``kiln serve`` must be ready in under three)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def default_intra_op_threads() -> int:
    """One ORT thread per usable core: on small machines oversubscription costs more than it gives."""
    return max(1, int(probe()["usable_cores"]))


def preferred_providers() -> list[str]:
    """GPU providers first where a GPU is really present, CPU always last."""
    info = probe()
    chosen = []
    if info["gpu"]:
        for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if name in info["ort_providers"]:
                chosen.append(name)
    chosen.append("CPUExecutionProvider")
    return chosen
