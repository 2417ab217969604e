"""P4Runtime byte strings: the one place values are encoded and decoded.

P4Runtime (spec "Bytestrings") carries every match value and action argument as a
big-endian byte string. Senders use the canonical form, the shortest one (at least one
byte), which is what the controller writes and the reference switch reads back, so that
plans and read-backs compare exactly. A receiver accepts any length as long as the value
fits the field's width (extra leading bytes must be zero) and stores the canonical form.
"""

from __future__ import annotations


class EncodingError(ValueError):
    """A byte string that is no value of the field's width."""


def encode(value: int, bits: int) -> bytes:
    """`value` as the canonical byte string of a `bits`-wide field."""
    if value < 0 or value >> bits:
        raise EncodingError(f"{value} does not fit in {bits} bits")
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def decode(data: bytes, bits: int, what: str = "value") -> int:
    """The integer in a received byte string; EncodingError (naming `what`) otherwise."""
    if not data:
        raise EncodingError(f"{what}: empty byte string")
    value = int.from_bytes(data, "big")
    if value >> bits:
        shown = data.hex() if len(data) <= 16 else f"{data[:16].hex()}... ({len(data)} bytes)"
        raise EncodingError(f"{what}: 0x{shown} does not fit in {bits} bits")
    return value
