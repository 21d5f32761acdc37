"""kiln.runtime.hardware: the probe recorded in manifests and reports."""

from __future__ import annotations

import json
import os

import onnxruntime as ort

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
