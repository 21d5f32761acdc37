"""kiln.serve.model: what a request is checked for before it joins a queue, and how its tensors reach the engine."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.config import ServeSettings
from kiln.errors import InvalidInput
from kiln.serve.model import TEXT_INPUT, ServedModel
from kiln.serve.protocol import InferRequest, RequestedOutput


def token_request(model: ServedModel, ids: np.ndarray[Any, Any], **overrides: np.ndarray[Any, Any]) -> InferRequest:
    """Token tensors for a text model: ``input_ids`` as given, the mask of ones and zero type ids unless overridden."""
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)} | overrides
    names = [spec.name for spec in model.engines[0].inputs]
    return InferRequest(inputs={n: feeds[n] for n in names}, datatypes=dict.fromkeys(names, "INT64"))


@pytest.fixture(scope="module")
def minilm(minilm_artifact: artifacts.Artifact) -> ServedModel:
    return ServedModel(minilm_artifact, instances=1)


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary_are_refused_before_the_queue(minilm: ServedModel) -> None:
    # ONNX Runtime would fail the whole batch such a request is in, with a 500 for every request of it
    ids = np.array([[101, 2000, 102], [101, 9_999_999, 102]], dtype=np.int64)
    with pytest.raises(InvalidInput, match=r"token id 9999999 \(row 1, position 1\).*0 to 30521"):
        minilm.prepare(token_request(minilm, ids), max_rows=8)
    with pytest.raises(InvalidInput, match="token id -1"):
        minilm.prepare(token_request(minilm, np.array([[101, -1, 102]], dtype=np.int64)), max_rows=8)
    assert minilm.prepare(token_request(minilm, ids[:1]), max_rows=8).rows == 1


@pytest.mark.slow
def test_token_rows_must_hold_1_to_max_length_tokens_and_every_tensor_the_same_shape(minilm: ServedModel) -> None:
    assert minilm.tokenizer is not None
    limit = minilm.tokenizer.max_length
    with pytest.raises(InvalidInput, match=f"0 tokens a row.*1 to {limit}.*; send at least one token a row, or"):
        minilm.prepare(token_request(minilm, np.zeros((1, 0), dtype=np.int64)), max_rows=8)
    with pytest.raises(InvalidInput, match=f"{limit + 1} tokens a row"):
        minilm.prepare(token_request(minilm, np.full((1, limit + 1), 1000, dtype=np.int64)), max_rows=8)
    ids = np.array([[101, 2000, 102]], dtype=np.int64)
    with pytest.raises(InvalidInput, match=r'"attention_mask" has shape \[1, 2\] but "input_ids" has \[1, 3\]'):
        minilm.prepare(token_request(minilm, ids, attention_mask=np.ones((1, 2), dtype=np.int64)), max_rows=8)


@pytest.mark.slow
def test_an_unknown_input_of_a_text_model_is_told_the_token_tensors_it_also_takes(minilm: ServedModel) -> None:
    # a BERT tokenizer's output holds token_type_ids, which this MiniLM export does not take; "its inputs are text"
    # hid that input_ids and attention_mask are accepted, and "input_id" got no did-you-mean
    ids = np.array([[101, 2000, 102]], dtype=np.int64)
    names = [spec.name for spec in minilm.engines[0].inputs]
    assert names == ["input_ids", "attention_mask"]
    extra = token_request(minilm, ids)
    extra.inputs["token_type_ids"] = np.zeros_like(ids)
    with pytest.raises(InvalidInput, match=r'it takes "text", or the token tensors input_ids, attention_mask$'):
        minilm.prepare(extra, max_rows=8)
    typo = InferRequest(inputs={"input_id": ids}, datatypes={"input_id": "INT64"})
    with pytest.raises(InvalidInput, match='did you mean "input_ids"'):
        minilm.prepare(typo, max_rows=8)
    # a gRPC request without inputs (HTTP's codec refuses an empty list first) was told input_ids was missing, an
    # input the model's metadata never lists
    with pytest.raises(InvalidInput, match=r'^the request has no inputs; model "minilm" needs text$'):
        minilm.prepare(InferRequest(inputs={}, datatypes={}), max_rows=8)


@pytest.mark.slow
def test_long_texts_are_tokenized_off_the_event_loop(minilm: ServedModel) -> None:
    def text_request(*texts: str) -> InferRequest:
        array = np.array([t.encode() for t in texts], dtype=np.object_)
        return InferRequest(inputs={TEXT_INPUT: array}, datatypes={TEXT_INPUT: "BYTES"})

    assert not minilm.slow_to_prepare(text_request("a sentence", "another one"), max_rows=8)
    assert minilm.slow_to_prepare(text_request("word " * 10_000), max_rows=8)
    assert not minilm.slow_to_prepare(text_request(*["word " * 10_000] * 9), max_rows=8)  # refused at once
    huge = minilm.prepare(text_request("word " * 2_000_000), max_rows=8)  # 10 MB: read up to max_chars
    assert huge.token_ids is not None and len(huge.token_ids[0]) == minilm.tokenizer.max_length  # type: ignore[union-attr]


@pytest.fixture
def echo_repo(tmp_path: Path) -> Path:
    """Model "echo": a real ONNX Identity on a STRING tensor [-1] (BYTES in V2)."""
    import onnx
    from onnx import TensorProto, helper

    from kiln.types import Signature, TensorSpec

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_out"])],
        "echo",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("s_out", TensorProto.STRING, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "echo.onnx"
    onnx.save(model, str(path))
    signature = Signature(inputs=(TensorSpec("s", "BYTES", (-1,)),), outputs=(TensorSpec("s_out", "BYTES", (-1,)),))
    repo = tmp_path / "echo-repo"
    artifacts.write(repo, artifacts.Manifest(name="echo", signature=signature), path)
    return repo


def test_strings_reach_a_non_text_model_as_the_text_that_was_sent(
    echo_repo: Path, start_server: Callable[..., Any]
) -> None:
    # ONNX Runtime calls str() on what it is given: bytes came back as "b'ok'"
    server = start_server(echo_repo, ServeSettings(), http=True)
    body = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ok", "naïve"]}]}
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/echo/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (output,) = json.loads(response.read())["outputs"]
    assert output["data"] == ["ok", "naïve"]
    model = server.plane.repository.get("echo", None).model
    bad = InferRequest(inputs={"s": np.array([b"\xff\xfe"], dtype=np.object_)}, datatypes={"s": "BYTES"})
    with pytest.raises(InvalidInput, match='input "s": element 0 is not valid UTF-8'):
        model.prepare(bad, max_rows=8)


def test_classification_of_a_string_output_is_refused_before_the_queue(
    echo_repo: Path, start_server: Callable[..., Any]
) -> None:
    model = start_server(echo_repo, ServeSettings(), http=True).plane.repository.get("echo", None).model
    request = InferRequest(
        inputs={"s": np.array([b"ok"], dtype=np.object_)},
        outputs=[RequestedOutput("s_out", classification=1)],
        datatypes={"s": "BYTES"},
    )
    with pytest.raises(InvalidInput, match='output "s_out" is BYTES, and "classification" ranks numbers'):
        model.prepare(request, max_rows=8)


def test_a_request_its_client_cancelled_counts_as_a_failure(slow_repo: Path, start_server: Callable[..., Any]) -> None:
    # gRPC cancels the handler when its client goes away; the request was counted neither way
    import asyncio

    server = start_server(slow_repo, ServeSettings(instances=1, max_rows_per_request=2048, max_queue_rows=4096))
    rows = np.zeros((2048, 4), dtype=np.float32)

    async def infer_then_cancel() -> None:
        request = InferRequest(inputs={"input": rows}, datatypes={"input": "FP32"})
        call = asyncio.create_task(server.plane.infer("slow", None, request))
        await asyncio.sleep(0.01)  # queued or running
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)

    server.call(infer_then_cancel())
    text = server.plane.metrics_text().decode()
    assert 'kiln_request_failures_total{model="slow",reason="cancelled",version="1"} 1.0' in text
    assert server.plane.statistics("slow", None)["model_stats"][0]["inference_stats"]["fail"]["count"] == 1


def test_instances_run_on_a_session_each_or_share_fewer_sessions(
    tiny_artifact: artifacts.Artifact, tiny_weights: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    split = ServedModel(tiny_artifact, instances=4, intra_op_threads=1)
    assert len({id(engine) for engine in split.engines}) == 4 and split.settings["sessions"] == 4
    shared = ServedModel(tiny_artifact, instances=4, sessions=2, intra_op_threads=2)
    assert len(shared.engines) == 4 and len({id(engine) for engine in shared.engines}) == 2
    assert shared.engines[0] is shared.engines[2] and shared.engines[1] is shared.engines[3]
    assert shared.settings | {"sessions": 2, "intra_op_threads": 2} == shared.settings
    assert ServedModel(tiny_artifact, instances=2, sessions=9).settings["sessions"] == 2  # no idle copies

    # every instance of a shared session at once: each request gets its own rows' answer
    weight, bias = tiny_weights
    rows = [np.random.default_rng(seed).standard_normal((1 + seed, 4)).astype(np.float32) for seed in range(64)]
    works = [shared.prepare(InferRequest(inputs={"input": x}, datatypes={"input": "FP32"}), max_rows=256) for x in rows]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: shared.execute([works[i]], i % 4)[0]["probabilities"], range(64)))
    for x, answer in zip(rows, answers, strict=True):
        logits = x @ weight + bias
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(answer, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)


def test_sessions_below_one_are_refused() -> None:
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="sessions is 0; it must be >= 1"):
        ServeSettings(sessions=0)
