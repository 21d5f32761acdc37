"""kiln.serve.codec: V2 tensors in JSON and binary form, and the errors a client gets for malformed ones."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kiln.errors import InvalidInput
from kiln.serve.codec import decode_texts, from_bytes, from_json_data, to_bytes, to_json_data


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
