"""kiln.runtime.hardware: the probe recorded in manifests and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from kiln.runtime import default_intra_op_threads, preferred_providers, probe
from kiln.runtime.hardware import _ISA_FLAGS


def test_probe_describes_the_machine() -> None:
    info = probe()
    assert set(info) >= {"cpu", "machine", "logical_cores", "usable_cores", "isa", "int8_fast", "ort_providers", "gpu"}
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert 1 <= info["usable_cores"] <= info["logical_cores"] == (os.cpu_count() or 1)
    assert info["onnxruntime"] == ort.__version__
    assert isinstance(info["gpu"], bool)


def test_probe_isa_flags_are_booleans_for_every_flag_that_matters() -> None:
    isa = probe()["isa"]
    assert set(isa) == set(_ISA_FLAGS)
    assert all(isinstance(v, bool) for v in isa.values())
    assert probe()["int8_fast"] == (isa["avx512_vnni"] or isa["avx_vnni"] or isa["amx_int8"])


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_probe_reads_the_cpu_model_and_flags_the_kernel_reports() -> None:
    lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last core's lines: cores agree
    flags = set(next(line for line in lines if line.startswith("flags")).split(":", 1)[1].split())
    assert flags, "no flags line: this test would tell nothing"
    assert probe()["isa"] == {flag: flag in flags for flag in _ISA_FLAGS}
    assert probe()["cpu"] == fields["model name\t"].strip()


def test_probe_lists_onnxruntime_providers_including_cpu() -> None:
    providers = probe()["ort_providers"]
    assert "CPUExecutionProvider" in providers
    assert providers == ort.get_available_providers()


def test_probe_is_json_ready() -> None:
    info = probe()
    assert json.loads(json.dumps(info)) == info


def test_preferred_providers_end_with_cpu() -> None:
    providers = preferred_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert providers.count("CPUExecutionProvider") == 1
    assert set(providers) <= set(probe()["ort_providers"])
    if not probe()["gpu"]:
        assert providers == ["CPUExecutionProvider"]


def test_default_intra_op_threads_is_the_usable_core_count() -> None:
    assert default_intra_op_threads() == probe()["usable_cores"] >= 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cores_follow_the_cpu_affinity_not_the_machine() -> None:
    # a container or taskset that grants one core must get one ORT thread, however many cores the machine has
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from kiln.runtime import default_intra_op_threads, probe; "
        "print(probe()['usable_cores'], default_intra_op_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "1"]
