"""Fixed-format sense data (SPC-4 4.5.3): 18 bytes, response code 70h (current error)."""

from __future__ import annotations

FIXED_SENSE_LEN = 18


def build_sense(key: int, asc: int, ascq: int = 0, *, information: int | None = None,
                field_pointer: int | None = None, bit_pointer: int | None = None,
                cdb_field: bool = True) -> bytes:
    """Fixed-format sense for ``key``/``asc``/``ascq``.

    ``information`` (e.g. the miscompare offset) sets the VALID bit and bytes 3-6;
    ``field_pointer`` adds a sense-key specific field pointer (SKSV) naming the byte (and bit)
    of the CDB (``cdb_field=True``, C/D bit set) or of the parameter list that was wrong.
    """
    s = bytearray(FIXED_SENSE_LEN)
    s[0] = 0x70
    s[2] = key & 0x0F
    if information is not None:
        s[0] |= 0x80
        s[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    s[7] = FIXED_SENSE_LEN - 8
    s[12] = asc
    s[13] = ascq
    if field_pointer is not None:
        s[15] = 0x80 | (0x40 if cdb_field else 0)
        if bit_pointer is not None:
            s[15] |= 0x08 | (bit_pointer & 0x07)
        s[16:18] = (field_pointer & 0xFFFF).to_bytes(2, "big")
    return bytes(s)


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed (70h/71h) or descriptor (72h/73h) sense data."""
    if not sense:
        return (0, 0, 0)
    code = sense[0] & 0x7F
    if code in (0x72, 0x73):
        return (sense[1] & 0x0F, sense[2], sense[3])
    return (sense[2] & 0x0F, sense[12], sense[13])
