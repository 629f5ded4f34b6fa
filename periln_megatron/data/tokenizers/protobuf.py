"""The one protobuf reader: enough of the wire format to read a SentencePiece ModelProto (its
pieces, trainer and normalizer specs) without the protobuf package. Used by the SentencePiece
tokenizer (data/tokenizers/sentencepiece.py) and the Hugging Face export (hf/tokenizer.py)."""

from __future__ import annotations


class ProtobufError(ValueError):
    pass


def varint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, index after it) of the base-128 varint at buf[i]."""
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ProtobufError(f"not a protobuf message (a varint runs past the end, byte {i})")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf: bytes):
    """Yield (field number, wire type, value) of one message, in order: an int for a varint, the raw
    bytes of a fixed64/fixed32 or of a length-delimited value (a string or a nested message)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, i = varint(buf, i)
            else:
                size = 8 if wire == 1 else 4
            if i + size > n:
                raise ProtobufError(f"not a protobuf message (field {field} runs past the end, byte {i})")
            value, i = buf[i:i + size], i + size
        else:
            raise ProtobufError(f"not a protobuf message (wire type {wire} at byte {i})")
        yield field, wire, value


def last_values(buf: bytes) -> dict[int, int | bytes]:
    """{field number: value} of one message; a repeated field keeps its last value."""
    return {field: value for field, _, value in fields(buf)}
