"""The engines a benchmark compares, each behind one call that takes a request the way a user sends it.

A text model is timed from raw strings (tokenization and length-sorted batching inside the timed region, as a
user sees it); a tabular model from numpy feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.artifact import Artifact
from kiln.data import EvalSet
from kiln.errors import ConfigError, InvalidInput, KilnError
from kiln.runtime import Engine, OrtEngine, TextEncoder, TorchEngine, text_encoder_for
from kiln.types import Feeds, TensorSpec

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
Request = list[str] | Feeds  # texts for text models, feeds of the same rows for the others
_FLOAT_DTYPES = ("FP32", "FP16", "FP64")
SOURCE_ENGINE_NAME = "pytorch-eager"


@dataclass
class Candidate:
    """One engine in the comparison.

    ``output`` names the output that is compared and scored; ``encoder`` is set for text models.
    """

    name: str
    engine: Engine
    size_bytes: int
    output: str
    encoder: TextEncoder | None = None

    def infer(self, request: Request, batch_size: int) -> Array:
        """Run one request; texts are encoded in length-sorted batches of ``batch_size``, feeds in row chunks."""
        if self.encoder is not None:
            assert isinstance(request, list)
            return self.encoder.encode(request, batch_size=batch_size)
        assert isinstance(request, dict)
        rows = len(next(iter(request.values())))
        if rows <= batch_size:
            return self.engine.run(request)[self.output]
        chunks = [
            self.engine.run({k: v[start : start + batch_size] for k, v in request.items()})[self.output]
            for start in range(0, rows, batch_size)
        ]
        return np.concatenate(chunks)


def variant_label(artifact: Artifact) -> str:
    """The last transform applied to an artifact (e.g. ``int8-dynamic-per-channel``), or ``fp32`` for none."""
    transforms = artifact.manifest.provenance.get("transforms") or []
    if transforms and isinstance(transforms[-1], dict) and transforms[-1].get("name"):
        return str(transforms[-1]["name"])
    return "fp32"


def engine_name(artifact: Artifact) -> str:
    """``"minilm v2 (int8-dynamic-per-channel)"``."""
    return f"{artifact.name} v{artifact.version} ({variant_label(artifact)})"


def is_text(artifact: Artifact) -> bool:
    return artifact.manifest.preprocessing.get("kind") == "text"


def scored_output(artifact: Artifact) -> str:
    """The output bench compares: the embedding for text models, else the first float output (probabilities
    rather than a classifier's integer label), else the first output."""
    outputs = artifact.manifest.signature.outputs
    if is_text(artifact):
        return outputs[0].name
    return next((spec.name for spec in outputs if spec.dtype in _FLOAT_DTYPES), outputs[0].name)


def _describe(specs: Sequence[TensorSpec]) -> str:
    return "[" + ", ".join(f"{s.name} {s.dtype}" for s in specs) + "]"


def check_comparable(artifacts: Sequence[Artifact]) -> None:
    """Every artifact must take the same inputs and give the compared output, or the comparison is meaningless.

    Raises:
        InvalidInput: no artifacts, or one whose inputs, preprocessing or outputs differ from the first's.
    """
    if not artifacts:
        raise InvalidInput(
            "no artifacts to benchmark (got an empty list); bench compares one or more versions of one model; "
            "pass at least one artifact, e.g. bench([load('kiln-repo/digits')])"
        )
    first = artifacts[0]
    inputs = [(s.name, s.dtype) for s in first.manifest.signature.inputs]
    output = scored_output(first)
    for other in artifacts[1:]:
        where = f'model "{other.name}" v{other.version}'
        base = f'"{first.name}" v{first.version}'
        if [(s.name, s.dtype) for s in other.manifest.signature.inputs] != inputs:
            raise InvalidInput(
                f"{where} takes inputs {_describe(other.manifest.signature.inputs)}, but {base} takes "
                f"{_describe(first.manifest.signature.inputs)}; bench runs the same inputs through every artifact, "
                "so all must share one input signature; pass versions of one model (the original and its variants)",
                model=other.name,
                version=other.version,
            )
        if other.manifest.preprocessing.get("kind") != first.manifest.preprocessing.get("kind"):
            raise InvalidInput(
                f"{where} has preprocessing {other.manifest.preprocessing.get('kind')!r}, but {base} has "
                f"{first.manifest.preprocessing.get('kind')!r}; all artifacts must take the same kind of input; "
                "pass versions of one model",
                model=other.name,
                version=other.version,
            )
        if output not in other.manifest.signature.output_names:
            raise InvalidInput(
                f'{where} has no output "{output}" (its outputs are {", ".join(other.manifest.signature.output_names)})'
                f"; bench compares that output of {base} across artifacts; pass versions of one model",
                model=other.name,
                output=output,
            )


def check_batch_sizes(artifacts: Sequence[Artifact], batch_sizes: Sequence[int]) -> None:
    """A model exported with a fixed batch axis runs exactly that many rows at a time: other batch sizes are refused
    here, before any timing, rather than as ONNX Runtime's "invalid dimensions" in the middle of the run.

    Raises:
        ConfigError: a batch size other than an artifact's fixed batch dimension.
    """
    for art in artifacts:
        for spec in art.manifest.signature.inputs:
            fixed = spec.shape[0] if spec.shape else -1
            others = [bs for bs in batch_sizes if bs != fixed]
            if fixed > 0 and others:
                raise ConfigError(
                    f'model "{art.name}" v{art.version} takes a fixed batch of {fixed} row(s) (input "{spec.name}" '
                    f"has shape {list(spec.shape)}), so it cannot run batch size(s) {others}; pass --batch-sizes "
                    f"{fixed} (or KILN_BATCH_SIZES={fixed}), or export the model with a dynamic batch axis",
                    model=art.name,
                    version=art.version,
                    batch_sizes=others,
                )


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} #{n}", n + 1
    taken.add(candidate)
    return candidate


def build_candidates(artifacts: Sequence[Artifact], *, include_source: bool) -> list[Candidate]:
    """An ONNX Runtime engine per artifact, then the source PyTorch model of the first one when asked and known."""
    output = scored_output(artifacts[0])
    taken: set[str] = set()
    candidates = []
    for art in artifacts:
        engine = OrtEngine(art.model_path, name=engine_name(art))
        encoder = text_encoder_for(art, engine) if is_text(art) else None
        size = art.model_path.stat().st_size
        candidates.append(Candidate(_unique(engine.name, taken), engine, size, output, encoder))
    if include_source:
        source = load_source_engine(artifacts[0])
        if source is not None:
            first_encoder = candidates[0].encoder
            encoder = None if first_encoder is None else TextEncoder(source, first_encoder.tokenizer)
            name = _unique(SOURCE_ENGINE_NAME, taken)
            candidates.append(Candidate(name, source, torch_parameter_bytes(source), output, encoder))
    return candidates


def load_source_engine(artifact: Artifact) -> Engine | None:
    """The original PyTorch model behind an artifact, or None (scikit-learn/ONNX sources, or it cannot be rebuilt).

    A failure to rebuild is logged, not raised: the ONNX engines are still worth comparing.
    """
    try:
        from kiln.export import source_engine
    except ImportError:
        return None
    try:
        return source_engine(artifact)
    except (KilnError, ImportError, OSError) as exc:
        logger.warning(
            "cannot rebuild the PyTorch source of %s v%s (%s); benchmarking ONNX only",
            artifact.name,
            artifact.version,
            exc,
        )
        return None


def torch_parameter_bytes(engine: Engine) -> int:
    """Bytes of a PyTorch engine's parameters and buffers (0 when the engine holds no module)."""
    if not isinstance(engine, TorchEngine):
        return 0
    module = engine.module
    tensors = [*module.parameters(), *module.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def request_windows(rows: int, batch_size: int, count: int = 4) -> list[Array]:
    """Row indices of up to ``count`` disjoint requests of ``batch_size`` rows, in natural order.

    Several windows keep one lucky (short) batch from deciding the figures; when the set has fewer rows than a
    request needs, the rows repeat.
    """
    if rows < 1 or batch_size < 1:
        raise ValueError(f"need rows >= 1 and batch_size >= 1, got {rows} and {batch_size}")
    fitting = min(count, rows // batch_size)
    if fitting == 0:
        return [np.arange(batch_size) % rows]
    return [np.arange(i * batch_size, (i + 1) * batch_size) for i in range(fitting)]


def make_request(data: EvalSet, index: Array | slice) -> Request:
    """The rows at ``index`` as a request: a list of texts, or feeds."""
    subset = data.take(index)
    if subset.texts is not None:
        return list(subset.texts)
    assert subset.feeds is not None
    return subset.feeds
