"""Engines that run models: ONNX Runtime (default) and PyTorch eager, plus the hardware probe."""

from __future__ import annotations

from kiln.runtime.engine import Engine
from kiln.runtime.hardware import default_intra_op_threads, preferred_providers, probe
from kiln.runtime.onnx import OrtEngine, batch_coupled_ops
from kiln.runtime.text import TextEncoder, TextTokenizer, sorted_batches, text_encoder_for, tokenizer_for
from kiln.runtime.torch import TorchEngine, spec_of

__all__ = [
    "Engine",
    "OrtEngine",
    "TextEncoder",
    "TextTokenizer",
    "TorchEngine",
    "batch_coupled_ops",
    "default_intra_op_threads",
    "preferred_providers",
    "probe",
    "sorted_batches",
    "spec_of",
    "text_encoder_for",
    "tokenizer_for",
]
