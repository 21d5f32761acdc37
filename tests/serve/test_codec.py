"""kiln.serve.codec: V2 tensors in JSON and binary form, and the errors a client gets for malformed ones."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from kiln.errors import InvalidInput
from kiln.serve.codec import check_shape, decode_texts, from_bytes, from_json_data, to_bytes, to_json_data


def test_json_data_flat_or_nested_gives_the_same_tensor() -> None:
    flat = from_json_data("x", "INT32", (2, 3), [1, 2, 3, 4, 5, 6])
    nested = from_json_data("x", "INT32", (2, 3), [[1, 2, 3], [4, 5, 6]])
    assert flat.dtype == np.int32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize("dtype", ["FP32", "FP64", "FP16", "INT8", "INT64", "UINT16", "BOOL"])
def test_binary_round_trip_for_every_numeric_datatype(dtype: str) -> None:
    from kiln.types import V2_TO_NUMPY

    array = (np.arange(12) % 3).astype(V2_TO_NUMPY[dtype]).reshape(3, 4)
    np.testing.assert_array_equal(from_bytes("x", dtype, (3, 4), to_bytes(array)), array)


def test_bytes_round_trip_and_utf8_text() -> None:
    array = np.array([b"hello", "wörld".encode(), b""], dtype=np.object_)
    back = from_bytes("text", "BYTES", (3,), to_bytes(array))
    assert list(back) == list(array)
    assert decode_texts("text", back) == ["hello", "wörld", ""]
    assert to_json_data(back) == ["hello", "wörld", ""]


def test_malformed_tensors_name_the_input_and_the_rule() -> None:
    with pytest.raises(InvalidInput, match=r'input "x" has 5 elements but shape \[2, 3\] needs 6'):
        from_json_data("x", "FP32", (2, 3), [1, 2, 3, 4, 5])
    with pytest.raises(InvalidInput, match=r'input "x" has 8 bytes of binary data but shape \[3\] of FP32 needs 12'):
        from_bytes("x", "FP32", (3,), b"\0" * 8)
    with pytest.raises(InvalidInput, match=r'input "x" has datatype "FLOAT32", which is not a KServe V2 datatype'):
        from_json_data("x", "FLOAT32", (1,), [1.0])
    with pytest.raises(InvalidInput, match=r'input "x" has data that is not FP32'):
        from_json_data("x", "FP32", (2,), ["a", "b"])
    with pytest.raises(InvalidInput, match=r"BYTES element 0 claims 100 bytes but only 2 remain"):
        from_bytes("t", "BYTES", (1,), b"\x64\0\0\0ab")
    with pytest.raises(InvalidInput, match=r"element 1 is not valid UTF-8"):
        decode_texts("t", np.array([b"ok", b"\xff\xfe"], dtype=np.object_))


def test_a_bytes_shape_larger_than_its_data_is_refused_before_anything_is_allocated() -> None:
    # 10**12 elements would be 7 TiB of object pointers; every element needs at least its 4-byte length
    with pytest.raises(InvalidInput, match=r'input "t": its shape holds 1000000000000 BYTES elements but the data'):
        from_bytes("t", "BYTES", (10**12,), b"")
    with pytest.raises(InvalidInput, match="holds 3 BYTES elements but the data has 8 bytes"):
        from_bytes("t", "BYTES", (3,), to_bytes(np.array([b"", b""], dtype=np.object_)))


def test_the_binary_form_is_little_endian_and_row_major_as_the_extension_says() -> None:
    # against bytes built outside the codec, so a mistake made both ways (encode and decode) cannot hide
    assert to_bytes(np.array([1, 256], np.uint16)) == b"\x01\x00\x00\x01"
    assert to_bytes(np.arange(6, dtype=np.int32).reshape(2, 3).T) == struct.pack("<6i", 0, 3, 1, 4, 2, 5)
    assert to_bytes(np.array([True, False])) == b"\x01\x00"
    assert to_bytes(np.array([1.5], np.float16)) == struct.pack("<e", 1.5)
    assert to_bytes(np.array([b"hi", b""], dtype=np.object_)) == struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    np.testing.assert_array_equal(from_bytes("x", "INT64", (2,), struct.pack("<2q", -1, 2**40)), [-1, 2**40])
    np.testing.assert_array_equal(from_bytes("x", "FP64", (1, 2), struct.pack("<2d", 0.5, -2.0)), [[0.5, -2.0]])
    assert list(from_bytes("t", "BYTES", (2,), struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0))) == [b"hi", b""]


def test_a_shape_of_more_than_64_dimensions_is_refused_with_the_limit() -> None:
    # numpy cannot hold more than 64 dimensions; past that it raised ValueError, a 500 on every transport
    with pytest.raises(InvalidInput, match=r'input "x" has 65 dimensions; .* at most 64 .* reshape'):
        check_shape("x", [1] * 65)
    assert from_json_data("x", "FP32", check_shape("x", [1] * 64), [2.5]).shape == (1,) * 64
    with pytest.raises(InvalidInput, match=r'input "x" has shape \[True, 4\]'):
        check_shape("x", [True, 4])  # a boolean is not a dimension, though Python counts it as the int 1


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("BOOL", ["false", "false"], r'element 0 is "false" \(a string\); BOOL data must be JSON booleans'),
        ("BOOL", [5, 0], r"element 0 is 5 \(an integer\); BOOL data must be JSON booleans"),
        ("BOOL", [[True, False], [True, "a"]], r'element 3 is "a" \(a string\)'),
        ("INT8", [1.7], r"element 0 is 1.7 \(a float\); INT8 data must be JSON integers"),
        ("INT32", [1, True], r"element 1 is true \(a boolean\); INT32 data must be JSON integers"),
        ("INT64", ["1"], r'element 0 is "1" \(a string\); INT64 data must be JSON integers'),
        ("UINT8", [1.0], r"element 0 is 1.0 \(a float\)"),
        ("FP32", [1, None, 3], r"element 1 is null; FP32 data must be JSON numbers"),
        ("FP32", ["1", 2, 3], r'element 0 is "1" \(a string\); FP32 data must be JSON numbers'),
        ("FP32", [True, 2, 3], r"element 0 is true \(a boolean\)"),
        ("FP64", [[1.0], [{"a": 1}]], r'element 1 is \{"a":1\} \(an object\)'),
        ("INT8", [1, 300], r"element 1 is 300, out of range for INT8 \[-128, 127\]"),
        ("UINT8", [-1], r"element 0 is -1, out of range for UINT8 \[0, 255\]"),
        ("INT64", [2**63], r"element 0 is 9223372036854775808, out of range for INT64"),
        ("FP32", [1.0, 1e300], r"element 1 is 1e\+300, out of range for FP32 \(largest finite 3.4028235e\+38\)"),
        ("FP16", [1e6], r"element 0 is 1000000.0, out of range for FP16 \(largest finite 65504\)"),
        ("FP16", [-70000], r"element 0 is -70000, out of range for FP16"),
    ],
)
def test_json_data_must_be_of_the_datatype_json_type_and_range(datatype: str, data: Any, message: str) -> None:
    # Triton's rules: BOOL takes booleans, INT*/UINT* integers, FP* numbers that fit; nothing is coerced
    shape = (np.asarray(data, dtype=np.object_).size,)
    with pytest.raises(InvalidInput, match=rf'input "x" has data that is not {datatype}: {message}'):
        from_json_data("x", datatype, shape, data)


def test_strict_json_data_still_takes_every_valid_form() -> None:
    np.testing.assert_array_equal(from_json_data("x", "FP32", (2, 2), [[1, 2.5], [3, -4]]), [[1, 2.5], [3, -4]])
    np.testing.assert_array_equal(from_json_data("x", "BOOL", (1, 2), [[True, False]]), [[True, False]])
    np.testing.assert_array_equal(from_json_data("x", "INT8", (3,), [-128, 0, 127]), [-128, 0, 127])
    assert from_json_data("x", "UINT64", (1,), [2**64 - 1])[0] == 2**64 - 1
    assert from_json_data("x", "FP16", (1,), [65504])[0] == 65504
    assert from_json_data("x", "FP64", (1,), [1e300])[0] == 1e300
    # nesting is flattened as Triton does, whatever its depth or mix
    np.testing.assert_array_equal(from_json_data("x", "INT32", (3,), [1, [2, [3]]]), [1, 2, 3])
    np.testing.assert_array_equal(from_json_data("x", "INT32", (2, 1, 1), [[[1]], [[2]]]), [[[1]], [[2]]])
    assert from_json_data("x", "FP32", (0, 4), []).shape == (0, 4)
    # gRPC's typed contents may carry inf and nan themselves: only a finite value that overflows is refused
    values = from_json_data("x", "FP32", (2,), [float("inf"), float("nan")])
    assert np.isinf(values[0]) and np.isnan(values[1])


def test_top_classes_are_tritons_value_index_label_strings_highest_first() -> None:
    from kiln.serve.codec import top_classes

    scores = np.array([[1, 5, 10, 4], [3, 3, 1, 3]], np.int64)  # the example of Triton's extension, and ties
    assert top_classes(scores, 2, ["a", "b", "c"]).tolist() == [[b"10:2:c", b"5:1:b"], [b"3:0:a", b"3:1:b"]]
    probabilities = np.array([[0.1, 0.7, 0.2]], np.float32)
    # more classes than the row has: all of them (Triton clamps); floats print as std::to_string does
    assert top_classes(probabilities, 5, []).tolist() == [[b"0.700000:1", b"0.200000:2", b"0.100000:0"]]
    assert top_classes(probabilities[0], 1, ["x", "y"], batched=False).tolist() == [b"0.700000:1:y"]
    assert top_classes(np.array([3, 1], np.int32), 2, []).tolist() == [[b"3:0"], [b"1:0"]]  # one value a row
    smallest = np.array([[np.iinfo(np.int64).min, 0]], np.int64)  # no negation that overflows
    assert top_classes(smallest, 2, []).tolist() == [[b"0:1", f"{np.iinfo(np.int64).min}:0".encode()]]


@pytest.mark.parametrize("value", [0, -1, "3", True, 2.0, None, [3]])
def test_a_class_count_is_a_positive_integer(value: Any) -> None:
    from kiln.serve.codec import class_count

    assert class_count("probabilities", 3) == 3
    with pytest.raises(InvalidInput, match=r'"classification" of output "probabilities" is .*a positive integer'):
        class_count("probabilities", value)


def test_json_outputs_keep_nan_and_infinities_as_tritonclient_reads_them() -> None:
    # orjson wrote all three as null, which tritonclient's as_numpy read back as NaN: -inf and inf were lost
    import orjson
    import rapidjson  # tritonclient.http's parser

    array = np.array([[np.inf, -np.inf, np.nan, 2.5]], dtype=np.float32)
    body = orjson.dumps({"outputs": [{"name": "y", "data": to_json_data(array)}]})
    assert b"[Infinity,-Infinity,NaN,2.5]" in body
    back = np.array(rapidjson.loads(body)["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(back, array.reshape(-1))
    assert to_json_data(np.array([1.5, 2.0], dtype=np.float32)) == [1.5, 2.0]  # finite data: a plain list


def test_binary_bool_elements_are_0_or_1() -> None:
    # a byte of 2 (or 0xff) reached ONNX Runtime, whose Not read it as false: a wrong answer, with a 200
    np.testing.assert_array_equal(from_bytes("c", "BOOL", (3,), b"\x01\x00\x01"), [True, False, True])
    with pytest.raises(InvalidInput, match=r'input "c" \(BOOL\) holds byte 2 at element 1; a BOOL element is one'):
        from_bytes("c", "BOOL", (3,), b"\x01\x02\x00")
