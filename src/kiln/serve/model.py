"""One loaded model version: its public V2 signature, request validation, and batched execution.

Text models (MiniLM) take a ``text`` BYTES input and tokenize in the server with the artifact's fast tokenizer;
their token-id inputs are accepted too. Everything a client can get wrong is checked here, before a request
joins a queue, so a bad request never fails a batch of good ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.artifact import Artifact
from kiln.errors import InvalidInput, did_you_mean
from kiln.runtime import (
    OrtEngine,
    TextTokenizer,
    batch_coupled_ops,
    default_intra_op_threads,
    preferred_providers,
    tokenizer_for,
)
from kiln.serve.codec import decode_texts, top_classes
from kiln.serve.costmodel import BatchCostModel
from kiln.serve.protocol import Array, InferRequest
from kiln.types import Feeds, TensorSpec

logger = logging.getLogger(__name__)

TEXT_INPUT = "text"
# (rows, tokens): enough rows and lengths to separate the per-call, per-token and attention terms of the cost.
_WARMUP_TEXT_SHAPES = ((1, 16), (2, 16), (4, 16), (8, 16), (1, 32), (4, 32), (1, 64), (2, 64), (4, 64), (1, 128))
# Text a request may carry and still be tokenized on the event loop (about 10-20 ms of work at most; a
# typical request is a sentence or a paragraph). Longer ones are tokenized on a thread.
_LOOP_TEXT_CHARS = 32_768
_WARM_RUNS = 2  # measured runs per warm-up shape, after its first (cold) run
_WARMUP_TENSOR_ROWS = (1, 2, 8, 32)


@dataclass
class Work:
    """A validated request, ready to be stacked with others of the same ``key``.

    ``token_ids`` holds one list of ids per row for text requests; ``feeds`` the tensors otherwise.
    ``length`` is the padded length the request needs (its longest row; 1 for plain tensors). ``classes`` names the
    outputs to return as their top classes, and how many (the classification extension).
    """

    rows: int
    key: tuple[Any, ...]
    length: int
    outputs: list[str]
    token_ids: list[list[int]] | None = None
    feeds: Feeds = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)


class ServedModel:
    """An artifact's engines (one per instance), tokenizer, signature and learned batch cost.

    Example:
        >>> model = ServedModel(load("kiln-repo/minilm"), instances=1)  # doctest: +SKIP
        >>> model.warmup(max_batch_size=32)  # doctest: +SKIP
        >>> outputs = model.execute([model.prepare(request, max_rows=256)], instance=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        instances: int | None = None,
        sessions: int | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.artifact = artifact
        self.name = artifact.name
        self.version = artifact.version
        instances = instances or default_instances()
        sessions = min(sessions or instances, instances)
        threads = intra_op_threads or max(1, default_intra_op_threads() // sessions)
        pool = [
            OrtEngine(
                artifact.model_path,
                name=f"{self.name}:{self.version}#{i}",
                providers=preferred_providers(),
                intra_op_threads=threads,
                allow_spinning=False,  # a spinning pool would steal the cores the event loop needs
            )
            for i in range(sessions)
        ]
        # instance i runs on session i mod sessions (ONNX Runtime sessions take concurrent runs). Fewer sessions
        # than instances hold fewer copies of the weights, and each session's threads span more cores, so a batch
        # running alone is faster; but concurrent runs then contend for one thread pool, and under load the tail
        # grows (bench/serve_sessions.py). So the default is one session per instance.
        self.engines = [pool[i % sessions] for i in range(instances)]
        engine = self.engines[0]
        self.engine_inputs = {spec.name: spec for spec in engine.inputs}
        self.outputs = list(engine.outputs)
        self.output_names = [spec.name for spec in self.outputs]
        self.tokenizer = tokenizer_for(artifact)
        self.labels = [str(label) for label in artifact.manifest.postprocessing.get("labels") or ()]
        self.batchable = all(s.shape and s.shape[0] == -1 for s in [*engine.inputs, *engine.outputs])
        # rows of one request run together, as the client sent them; other clients' rows join them only where a
        # row's output does not depend on its batch-mates (an INT8 dynamic graph's does: its scales are per batch)
        self.coupled_ops = batch_coupled_ops(artifact.model_path) if self.batchable else []
        self.merges_requests = self.batchable and not self.coupled_ops
        self.cost = BatchCostModel()
        self.settings = {"instances": instances, "sessions": sessions, "intra_op_threads": threads, **engine.settings}

    # -- the public signature ---------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        """What clients send: ``text`` for text models, the ONNX inputs otherwise."""
        if self.tokenizer is not None:
            return [TensorSpec(TEXT_INPUT, "BYTES", (-1,))]
        return list(self.engine_inputs.values())

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    # -- validation ---------------------------------------------------------------------------------------------
    def prepare(self, request: InferRequest, *, max_rows: int) -> Work:
        """Check a request against the signature and the limits; tokenize text. Raises ``InvalidInput``."""
        work = self._prepare(request, self._requested_outputs(request), max_rows)
        work.classes = {out.name: out.classification for out in request.outputs if out.classification}
        return work

    def _prepare(self, request: InferRequest, outputs: list[str], max_rows: int) -> Work:
        if not request.inputs:  # the public inputs, not a text model's token tensors, which its metadata never lists
            raise InvalidInput(
                f'the request has no inputs; model "{self.name}" needs {", ".join(s.name for s in self.inputs)}'
            )
        if self.tokenizer is not None and TEXT_INPUT in request.inputs:
            extra = [k for k in request.inputs if k != TEXT_INPUT]
            if extra:
                raise InvalidInput(
                    f'input "{extra[0]}" cannot be sent with "{TEXT_INPUT}"; send either text or token tensors',
                    input=extra[0],
                )
            array = request.inputs[TEXT_INPUT]
            sent_as = request.datatypes.get(TEXT_INPUT, "BYTES")
            if sent_as != "BYTES" or array.dtype != np.object_:
                raise InvalidInput(
                    f'input "{TEXT_INPUT}" has datatype {sent_as}; this model expects BYTES (UTF-8 strings)',
                    input=TEXT_INPUT,
                )
            if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
                raise InvalidInput(
                    f'input "{TEXT_INPUT}" has shape {list(array.shape)}; send shape [n] (or [n, 1]): one string '
                    "per row",
                    input=TEXT_INPUT,
                )
            rows = int(array.shape[0])
            self._check_rows(TEXT_INPUT, rows, max_rows)
            ids = self.tokenizer.encode(decode_texts(TEXT_INPUT, array))
            return Work(
                rows=rows,
                key=(TEXT_INPUT,),
                length=max(len(row) for row in ids),
                outputs=outputs,
                token_ids=ids,
            )
        return self._prepare_tensors(request, outputs, max_rows)

    def slow_to_prepare(self, request: InferRequest, *, max_rows: int) -> bool:
        """Whether :meth:`prepare` would tokenize more than ``_LOOP_TEXT_CHARS`` characters: the server then runs it
        on a thread, as a long tokenization on the event loop stalls every other request and the health probes."""
        array = request.inputs.get(TEXT_INPUT) if self.tokenizer is not None else None
        if array is None or array.dtype != np.object_ or array.size > max_rows:  # prepare() refuses those at once
            return False
        return sum(len(item) for item in array.flat if isinstance(item, bytes | str)) > _LOOP_TEXT_CHARS

    def _prepare_tensors(self, request: InferRequest, outputs: list[str], max_rows: int) -> Work:
        expected = self.engine_inputs
        accepted = [*(spec.name for spec in self.inputs), *(expected if self.tokenizer is not None else ())]
        for name in request.inputs:
            if name not in expected:
                takes = f"its inputs are {', '.join(accepted)}"
                if self.tokenizer is not None:  # its token tensors are accepted too: name them, or "text" misleads
                    takes = f'it takes "{TEXT_INPUT}", or the token tensors {", ".join(expected)}'
                raise InvalidInput(
                    f'input "{name}" is not an input of model "{self.name}"{did_you_mean(name, accepted)}; {takes}',
                    input=name,
                )
        missing = [name for name in expected if name not in request.inputs]
        if missing:
            raise InvalidInput(
                f'input "{missing[0]}" is missing; model "{self.name}" needs {", ".join(expected)}',
                input=missing[0],
            )
        rows_seen: int | None = None
        key: list[Any] = []
        for name, spec in expected.items():
            array = request.inputs[name]
            sent_as = request.datatypes.get(name) or ("BYTES" if array.dtype == np.object_ else None)
            if sent_as is not None and sent_as != spec.dtype:
                raise InvalidInput(
                    f'input "{name}" has datatype {sent_as}; model "{self.name}" expects {spec.dtype}; '
                    f"send {spec.dtype}",
                    input=name,
                    expected=spec.dtype,
                    received=sent_as,
                )
            if not spec.fits(array.shape):
                raise InvalidInput(
                    f'input "{name}" has shape {list(array.shape)}; model "{self.name}" expects '
                    f"{list(spec.shape)} (-1: any size)",
                    input=name,
                    expected=list(spec.shape),
                    received=list(array.shape),
                )
            if self.batchable:
                if rows_seen is not None and array.shape[0] != rows_seen:
                    raise InvalidInput(
                        f'input "{name}" has {array.shape[0]} rows but the other inputs have {rows_seen}; '
                        "send the same number of rows in every input",
                        input=name,
                    )
                rows_seen = int(array.shape[0])
            key.append((name, tuple(array.shape[1:])))
        rows = rows_seen if rows_seen is not None else 1
        self._check_rows(next(iter(expected)), rows, max_rows)
        if not self.batchable:
            key.append(("unbatched", id(request)))  # never stacked with anything
        feeds = dict(request.inputs)
        for name, spec in expected.items():
            if spec.dtype == "BYTES":  # ONNX Runtime takes str for its string tensors, and str() of bytes is "b'..'"
                feeds[name] = np.array(decode_texts(name, feeds[name]), dtype=np.object_).reshape(feeds[name].shape)
        if self.tokenizer is not None:
            self._check_token_ids(feeds)
        return Work(rows=rows, key=tuple(key), length=self._tokens_per_row(feeds), outputs=outputs, feeds=feeds)

    def _check_token_ids(self, feeds: Feeds) -> None:
        """Token tensors sent to a text model: ids within the vocabulary, 1 to ``max_length`` a row, every tensor
        of the shape of ``input_ids``. The engine would fail on them otherwise, and fail the batch they are in."""
        assert self.tokenizer is not None
        ids = feeds.get("input_ids")
        if ids is None or ids.ndim != 2:
            return
        limit = self.tokenizer.max_length
        if not 1 <= ids.shape[1] <= limit:
            fix = "send shorter rows" if ids.shape[1] > limit else "send at least one token a row"
            raise InvalidInput(
                f'input "input_ids" has {ids.shape[1]} tokens a row; model "{self.name}" takes 1 to {limit} (its '
                f'tokenizer truncates to {limit}); {fix}, or send "{TEXT_INPUT}" and let the server tokenize',
                input="input_ids",
            )
        vocab = self.tokenizer.vocab_size
        outside = (ids < 0) | (ids >= vocab)
        if outside.any():
            row, column = (int(i) for i in np.argwhere(outside)[0])
            raise InvalidInput(
                f'input "input_ids" holds token id {int(ids[row, column])} (row {row}, position {column}); model '
                f'"{self.name}" has token ids 0 to {vocab - 1}; tokenize with the model\'s tokenizer, or send '
                f'"{TEXT_INPUT}"',
                input="input_ids",
            )
        for name, array in feeds.items():
            if array.shape != ids.shape:
                raise InvalidInput(
                    f'input "{name}" has shape {list(array.shape)} but "input_ids" has {list(ids.shape)}; send every '
                    "token tensor with the same shape",
                    input=name,
                )

    def _tokens_per_row(self, feeds: Feeds) -> int:
        """The padded length of a text model's token-id tensors (their second axis), what a batch of them costs by;
        1 for other tensor models."""
        ids = feeds.get("input_ids") if self.tokenizer is not None else None
        return int(ids.shape[1]) if ids is not None and ids.ndim == 2 else 1

    def _requested_outputs(self, request: InferRequest) -> list[str]:
        if not request.outputs:
            return list(self.output_names)
        names = [out.name for out in request.outputs]
        for i, out in enumerate(request.outputs):
            name = out.name
            if name in names[:i]:  # one answer a name: which of the two asks (a tensor, top classes) would it be?
                raise InvalidInput(f'output "{name}" is requested twice; list each output once', output=name)
            if name not in self.output_names:
                raise InvalidInput(
                    f'output "{name}" is not an output of model "{self.name}"{did_you_mean(name, self.output_names)}'
                    f"; its outputs are {', '.join(self.output_names)}",
                    output=name,
                )
            dtype = self.outputs[self.output_names.index(name)].dtype
            if out.classification and dtype in ("BYTES", "BOOL"):
                raise InvalidInput(
                    f'output "{name}" is {dtype}, and "classification" ranks numbers; ask for the top classes '
                    "of a numeric output (scores, probabilities), or drop the parameter",
                    output=name,
                )
        return names

    def _check_rows(self, name: str, rows: int, max_rows: int) -> None:
        if rows < 1:
            raise InvalidInput(f'input "{name}" has 0 rows; send at least one', input=name)
        if rows > max_rows:
            raise InvalidInput(
                f'input "{name}" has {rows} rows; this server accepts at most {max_rows} rows per request; '
                "split the request",
                input=name,
                rows=rows,
                max_rows=max_rows,
            )

    # -- execution ------------------------------------------------------------------------------------------------
    def execute(self, works: Sequence[Work], instance: int = 0, *, learn: bool = True) -> list[Feeds]:
        """Run requests of one ``key`` as one batch on engine ``instance``; outputs split back per request.

        With ``learn`` the batch's time trains the cost model (not for a shape's first, cold run).
        """
        engine = self.engines[instance]
        if works[0].token_ids is not None:
            ids = [row for work in works for row in (work.token_ids or [])]
            feeds = TextTokenizer.pad(ids, list(self.engine_inputs))
            length = feeds["input_ids"].shape[1]
        else:  # tensors: one request, or requests of one key (the same shapes after the first axis)
            feeds = works[0].feeds
            if len(works) > 1:
                feeds = {name: np.concatenate([w.feeds[name] for w in works]) for name in self.engine_inputs}
            length = works[0].length
        started = time.perf_counter()
        outputs = engine.run(feeds)
        seconds = time.perf_counter() - started
        rows = sum(w.rows for w in works)
        if learn:
            self.cost.observe(rows, length, seconds)
        results: list[Feeds] = []
        offset = 0
        for work in works:
            end = offset + work.rows
            result = {name: outputs[name][offset:end] if self.batchable else outputs[name] for name in work.outputs}
            for name, count in work.classes.items():
                result[name] = top_classes(result[name], count, self.labels, batched=self.batchable)
            results.append(result)
            offset = end
        return results

    def warmup(self, max_batch_size: int) -> float:
        """Run every engine over representative batch shapes; seeds the cost model. Returns seconds taken.

        The instances warm up side by side, as they will serve, so the learned cost includes their contention.
        """
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()
        shapes = self._warmup_shapes(max_batch_size)

        def warm(instance: int) -> None:
            for rows, length in shapes:
                work = self._synthetic_work(rows, length)
                self.execute([work], instance, learn=False)  # the first run of a shape pays for allocation
                for _ in range(_WARM_RUNS):
                    self.execute([work], instance)

        with ThreadPoolExecutor(len(self.engines)) as pool:
            list(pool.map(warm, range(len(self.engines))))
        self.cost.refit()  # the last shapes measured may have come after the last periodic refit
        return time.perf_counter() - started

    def _warmup_shapes(self, max_batch_size: int) -> list[tuple[int, int]]:
        if self.tokenizer is not None:
            limit = self.tokenizer.max_length
            return [(min(r, max_batch_size), min(t, limit)) for r, t in _WARMUP_TEXT_SHAPES]
        if not self.batchable:
            return [(1, 1)]
        return [(r, 1) for r in sorted({min(r, max_batch_size) for r in _WARMUP_TENSOR_ROWS})]

    def _synthetic_work(self, rows: int, length: int) -> Work:
        if self.tokenizer is not None:
            ids = [[101] + [1000] * (length - 2) + [102] for _ in range(rows)]
            return Work(rows=rows, key=(TEXT_INPUT,), length=length, outputs=self.output_names, token_ids=ids)
        feeds: Feeds = {}
        rng = np.random.default_rng(0)
        for name, spec in self.engine_inputs.items():
            shape = [rows if i == 0 and self.batchable else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
            feeds[name] = _synthetic(spec.numpy_dtype, shape, rng)
        return Work(rows=rows, key=("warmup",), length=1, outputs=self.output_names, feeds=feeds)


def default_instances() -> int:
    """One batch at a time per core on a CPU, one on a GPU.

    Measured on two cores with MiniLM at batch 1: one request at a time on a two-thread session leaves its
    threads waiting on each other in a small batch's many small operators, so two requests at once, on a
    one-thread session each, serve more sentences/s (``bench/serve_sessions.py`` also compares them with two
    requests at once on one shared two-thread session).
    """
    if preferred_providers()[0] != "CPUExecutionProvider":
        return 1
    return default_intra_op_threads()


def _synthetic(dtype: np.dtype[Any], shape: list[int], rng: np.random.Generator) -> Array:
    if dtype == np.object_:
        return np.full(shape, b"warm-up", dtype=np.object_)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)  # integers and booleans: 0 is a valid id, index and flag
