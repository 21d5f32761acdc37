"""gRPC messages <-> the transport-free request and response of ``kiln.serve.protocol``.

ModelInfer inputs arrive as typed ``contents`` (``fp32_contents``, ``bytes_contents`` ...) or, as
``tritonclient.grpc`` sends them, as ``raw_input_contents``: one blob per input in the layout of HTTP's binary
tensor extension, so ``kiln.serve.codec`` decodes both. Outputs leave as ``raw_output_contents``, as Triton sends
them. A malformed request raises ``InvalidInput`` naming the tensor, the rule and the fix. Nothing here imports
gRPC; ``kiln.serve.grpc`` calls these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from kiln.errors import InvalidInput
from kiln.serve.codec import (
    check_priority,
    check_shape,
    class_count,
    from_bytes,
    from_json_data,
    numpy_dtype,
    to_bytes,
    v2_datatype,
)
from kiln.serve.proto import grpc_service_pb2 as pb
from kiln.serve.protocol import Array, InferRequest, InferResponse, RequestedOutput

M = TypeVar("M", bound=Message)

# The typed contents field of each V2 datatype (Triton's rule). FP16 and BF16 have none: they travel raw.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_SHARED_MEMORY = "shared_memory_region"


def from_dict(data: Mapping[str, Any], message: M) -> M:
    """Fill ``message`` from a data-plane answer in Triton's JSON form; keys the proto does not declare are
    skipped (Kiln's proto declares only the fields Kiln fills)."""
    json_format.ParseDict(data, message, ignore_unknown_fields=True)  # fills ``message`` in place
    return message


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        return None
    value: bool | int | float | str = getattr(parameter, choice)
    return value


def decode_infer(message: pb.ModelInferRequest, deadline_s: float | None) -> InferRequest:
    """A ModelInferRequest -> ``InferRequest``; ``deadline_s`` is what is left of the call's gRPC deadline."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"the request has {len(message.inputs)} inputs but {len(raw)} raw_input_contents; send one "
            "raw_input_contents entry per input, in the order of the inputs (or none, and typed contents)"
        )
    inputs: dict[str, Array] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}] has no name; name every input as the model metadata does")
        if name in inputs:
            raise InvalidInput(f'input "{name}" appears twice; send each input once', input=name)
        if _SHARED_MEMORY in tensor.parameters:
            raise InvalidInput(
                f'input "{name}" is in shared memory region "{tensor.parameters[_SHARED_MEMORY].string_param}"; '
                "this server does not support the shared-memory extension: send the tensor's data in the request",
                input=name,
            )
        datatype = tensor.datatype
        numpy_dtype(datatype, name)  # an unknown datatype fails here, naming the input
        shape = check_shape(name, list(tensor.shape))
        if raw:
            if tensor.contents.ListFields():
                raise InvalidInput(
                    f'input "{name}" has both typed contents and raw_input_contents; send its data one way only',
                    input=name,
                )
            inputs[name] = from_bytes(name, datatype, shape, raw[i])
        else:
            inputs[name] = _from_contents(name, datatype, shape, tensor.contents)
        datatypes[name] = datatype
    parameters = {key: parameter_value(value) for key, value in message.parameters.items()}
    check_priority(parameters.get("priority"))
    return InferRequest(
        inputs=inputs,
        outputs=[_requested_output(out) for out in message.outputs],
        id=message.id,
        parameters=parameters,
        timeout_s=_timeout_s(parameters.get("timeout"), deadline_s),
        datatypes=datatypes,
    )


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> Array:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f'input "{name}" is {datatype}, which has no typed contents field in the V2 gRPC protocol; send it '
            "in raw_input_contents (tritonclient's set_data_from_numpy does)",
            input=name,
        )
    present = [descriptor.name for descriptor, _ in contents.ListFields()]
    if present and present != [field]:
        raise InvalidInput(
            f'input "{name}" is {datatype} but its values are in {", ".join(present)}; a {datatype} tensor\'s '
            f"values go in {field} (or raw_input_contents)",
            input=name,
        )
    return from_json_data(name, datatype, shape, list(getattr(contents, field)))  # checks types and ranges


def _requested_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    if _SHARED_MEMORY in output.parameters:
        raise InvalidInput(
            f'output "{output.name}" asks for shared memory; this server does not support the shared-memory '
            "extension: request the output without it",
            output=output.name,
        )
    classes = 0
    if "classification" in output.parameters:
        parameter = output.parameters["classification"]
        kind = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, kind) if kind else None
        classes = class_count(output.name, value)  # tritonclient sends int64_param; a string or a bool is refused
    return RequestedOutput(output.name, classification=classes)  # gRPC outputs are always raw bytes


def _timeout_s(parameter: Any, deadline_s: float | None) -> float | None:
    """The tighter of the ``timeout`` parameter (microseconds, Triton's unit) and the gRPC deadline."""
    timeout_s = None
    if parameter is not None:
        if isinstance(parameter, bool) or not isinstance(parameter, int | float) or parameter <= 0:
            raise InvalidInput(
                f'parameter "timeout" is {parameter!r}; send a positive number of microseconds (int64_param)'
            )
        timeout_s = float(parameter) / 1e6
    if deadline_s is not None:
        timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
    return timeout_s


def encode_infer(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs as ``raw_output_contents`` (one blob per output, in the order of ``outputs``), as Triton does."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for name, array in response.outputs.items():
        message.outputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        message.raw_output_contents.append(to_bytes(array))
    return message
