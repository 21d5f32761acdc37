"""The end of every run: the trained model through ``kiln.export`` (parity gate included) into a repository.

``kiln.export.export`` writes its own provenance (the source framework) but has no slot for how the model was
trained, so the model is exported into a temporary repository first, then written as the next version of the
real one with ``provenance.train``, ``settings.train`` and ``checks.train`` added. The ONNX file is the one the
parity gate checked, byte for byte.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln import artifact as artifacts
from kiln.config import ExportSettings, settings_dict
from kiln.data import HELDOUT_FILE, heldout_texts_asset
from kiln.export import export
from kiln.train.data import TrainData
from kiln.train.prune import bert_layers
from kiln.train.settings import TrainSettings
from kiln.train.text import SentenceEncoder, TextBatcher, TextClassifier, TextData, merge_lora

_EXAMPLE_ROWS = 8


def export_trained(
    model: nn.Module,
    data: TrainData,
    settings: TrainSettings,
    *,
    export_settings: ExportSettings | None,
    provenance: dict[str, Any],
) -> artifacts.Artifact:
    """Export ``model`` (on CPU, float32) with the held-out set, and record the training run in its manifest."""
    output = "logits" if data.task == "classification" else "prediction"
    with tempfile.TemporaryDirectory(prefix="kiln-train-export-") as tmp:
        staged = export(
            model.eval(),
            out=Path(tmp),
            name=settings.run_name,
            example_inputs=torch.from_numpy(data.x_test[:_EXAMPLE_ROWS]),
            input_names=["input"],
            output_names=[output],
            task=data.task,
            eval_data=(data.x_test, data.y_test),
            labels=list(data.labels) or None,
            settings=export_settings,
        )
        return _republish(staged, settings, provenance)


def export_text(
    model: nn.Module,
    batcher: TextBatcher,
    data: TextData,
    ids_test: list[list[int]],
    settings: TrainSettings,
    *,
    export_settings: ExportSettings | None,
    provenance: dict[str, Any],
) -> artifacts.Artifact:
    """Merge LoRA adapters, export ``(input_ids, attention_mask) -> logits`` with the tokenizer as an asset."""
    assert isinstance(model, TextClassifier)
    model = merge_lora(model).eval()
    sample = TextBatcher.pad(ids_test[:_EXAMPLE_ROWS])
    # NOTE: Hugging Face encoders go through TorchScript, as in `kiln export` (the graph ORT's fuser knows).
    chosen = dataclasses.replace(export_settings or ExportSettings(), exporter="torchscript")
    with tempfile.TemporaryDirectory(prefix="kiln-train-export-") as tmp:
        staged = export(
            model,
            out=Path(tmp),
            name=settings.run_name,
            example_inputs=sample,
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            task="classification",
            labels=list(data.labels),
            settings=chosen,
        )
        preprocessing = {"kind": "text", "tokenizer": "tokenizer/tokenizer.json", "max_length": batcher.max_length}
        # the held-out texts and labels, so `kiln optimize` and `kiln bench` guard the task's accuracy on them
        heldout = heldout_texts_asset(data.texts_test, np.asarray(data.y_test))
        return _republish(
            staged,
            settings,
            provenance | {"lora_merged": bool(settings.lora_rank)},
            preprocessing=preprocessing,
            extra_assets={"tokenizer/tokenizer.json": batcher.tokenizer_file, HELDOUT_FILE: heldout},
            eval_data={"kind": "text", "file": HELDOUT_FILE, "rows": len(data.texts_test)},
            source=_encoder_source(model, pruned=bool(settings.prune_ratio)),
        )


def _encoder_source(model: nn.Module, *, pruned: bool) -> dict[str, Any]:
    """What ``kiln optimize`` needs to treat the classifier as the transformer it is: its fuser finds attention by
    head count and attention width. After pruning those are the heads every layer kept (pruning keeps as many in
    each) and their width; 0 (found from the graph, which fails for a width below the hidden size) only where the
    layers differ."""
    encoder: Any = model.encoder
    config = encoder.config
    heads, width = int(config.num_attention_heads), int(config.hidden_size)
    if pruned:  # what pruning left each layer (apply_heads sets both)
        layers: list[Any] = list(bert_layers(model) or ())
        attentions = [layer.attention.self for layer in layers]
        kept = {(int(a.num_attention_heads), int(a.all_head_size)) for a in attentions}
        heads, width = kept.pop() if len(kept) == 1 else (0, 0)
    return {
        "transformer": True,
        "architecture": type(encoder).__name__,
        "num_attention_heads": heads,
        "hidden_size": width,
    }


def export_embedding(
    model: nn.Module,
    base: Path,
    settings: TrainSettings,
    *,
    export_settings: ExportSettings | None,
    provenance: dict[str, Any],
) -> artifacts.Artifact:
    """Merge LoRA adapters, save the encoder as a sentence-transformers directory, export it as ``kiln export``.

    The directory goes beside the checkpoints (``<checkpoint_dir>/sentence-encoder``, replaced by each export)
    and is exported exactly as ``kiln export minilm`` exports the bundled one: ``(input_ids, attention_mask) ->
    sentence_embedding`` with pooling and normalisation in the graph, the tokenizer in ``assets/``, the source
    recorded for the transformer fusions of ``kiln optimize`` and the PyTorch engine of ``kiln bench``.
    """
    from kiln.train.embedding import save_sentence_encoder

    assert isinstance(model, SentenceEncoder)
    encoder = merge_lora(model).encoder
    directory = save_sentence_encoder(
        encoder, base, settings.checkpoint_path / "sentence-encoder", settings.max_length
    ).resolve()
    with tempfile.TemporaryDirectory(prefix="kiln-train-export-") as tmp:
        staged = export(directory, out=Path(tmp), name=settings.run_name, settings=export_settings)
        return _republish(
            staged, settings, provenance | {"lora_merged": bool(settings.lora_rank), "encoder_dir": str(directory)}
        )


def _republish(
    staged: artifacts.Artifact,
    settings: TrainSettings,
    provenance: dict[str, Any],
    *,
    preprocessing: dict[str, Any] | None = None,
    extra_assets: dict[str, Path | bytes] | None = None,
    eval_data: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> artifacts.Artifact:
    manifest = dataclasses.replace(staged.manifest)
    if eval_data:
        manifest.eval_data = eval_data
    if source:
        manifest.provenance = {**manifest.provenance, "source": {**manifest.provenance.get("source", {}), **source}}
    manifest.provenance = {**manifest.provenance, "train": provenance}
    manifest.settings = {**manifest.settings, "train": settings_dict(settings)}
    manifest.checks = {**manifest.checks, "train": provenance["metrics"]}
    if preprocessing:
        manifest.preprocessing = preprocessing
    assets: dict[str, Path | bytes] = {
        p.relative_to(staged.assets_dir).as_posix(): p for p in staged.assets_dir.rglob("*") if p.is_file()
    }
    return artifacts.write(Path(settings.out), manifest, staged.model_path, assets=assets | (extra_assets or {}))
