"""Small files that declare huge images (decompression bombs), written without decoding anything."""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 11000, height: int = 11000, mode: str = "L") -> bytes:
    """A valid PNG of `width` x `height` zero pixels: about 120 KB for 11000 x 11000 greyscale; RGBA when
    mode is "RGBA" (colour type 6)."""
    channels, colour = (4, 6) if mode == "RGBA" else (1, 0)
    comp = zlib.compressobj(9)
    row = b"\x00" * (width * channels + 1)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
