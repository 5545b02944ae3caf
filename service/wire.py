"""Just enough of the protobuf wire format to see which top-level fields a
request carries. Parsing keeps only the last member of a oneof, so a request
that sets two prompt kinds can only be told apart on the wire."""

from __future__ import annotations


class WireError(ValueError):
    pass


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise WireError("truncated varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def top_level_fields(data: bytes) -> list[int]:
    """Field numbers present in a serialized message, in wire order."""
    fields = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, i = _varint(data, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 2:
            n, i = _varint(data, i)
            i += n
        elif wire_type == 5:
            i += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if i > len(data):
            raise WireError("truncated field")
        fields.append(number)
    return fields
