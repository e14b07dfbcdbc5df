"""The codec of one stored origin: zarr v3's own codec chain, parsed once into :class:`Codec`.

An origin is an inner chunk of a sharded zarr array: ``bytes`` (little-endian), then
optionally ``zstd`` with its content checksum on, so that a damaged frame fails to
decode instead of decoding into garbage. The writer encodes with numcodecs, the
implementation zarr itself runs, so zarr reads every byte we write.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cache_tools.format.names import COMPRESSIONS

SUPPORTED_CODECS = ("zstd",)  # inner codecs after "bytes" that the readers decode


@dataclass(frozen=True)
class Codec:
    """A compression codec after ``bytes`` in an origin's codec chain."""

    name: str
    level: int = 0
    checksum: bool = False

    @classmethod
    def from_json(cls, doc: dict) -> "Codec":
        config = doc.get("configuration") or {}
        return cls(doc["name"], int(config.get("level", 0)), bool(config.get("checksum", False)))

    def to_json(self) -> dict:
        return {"name": self.name, "configuration": {"level": self.level, "checksum": self.checksum}}


def inner_codecs(compression: str, level: int) -> list[dict]:
    """zarr v3 codec chain of one origin (an inner chunk of the shard)."""
    chain = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        chain.append(Codec("zstd", int(level), True).to_json())
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r} (choices: {', '.join(COMPRESSIONS)})")
    return chain


def encoder(codec: Codec | None) -> Callable[[bytes], bytes] | None:
    """bytes -> stored bytes of one origin, with the codec implementation zarr itself uses (numcodecs)."""
    if codec is None:
        return None
    from numcodecs.zstd import Zstd

    return Zstd(level=codec.level, checksum=codec.checksum).encode


ZSTD_MAGIC = 0xFD2FB528


def zstd_frames_end(read: Callable[[int, int], bytes], size: int, count: int) -> tuple[int, int]:
    """Walk ``count`` zstd frames written back to back from byte 0 of a file of ``size`` bytes
    (``read(offset, n)`` reads it), by their headers alone (RFC 8878, section 3.1): returns
    (frames complete, where the last complete one ends, or where the incomplete one needs the
    file to reach at least). Stops early, with fewer frames, at bytes that are not a frame.

    How a shard whose index is unreadable tells "the file is cut" from "the index is damaged"
    (a cut file reads frame bytes where its index should be): the error path only.
    """
    pos = 0
    for k in range(count):
        header = read(pos, 5)  # magic, descriptor; the optional fields' sizes follow from the descriptor
        if len(header) < 5:
            return k, pos + 5
        if int.from_bytes(header[:4], "little") != ZSTD_MAGIC:
            return k, pos
        descriptor = header[4]
        single = descriptor >> 5 & 1
        fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        at = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
        checksum = 4 if descriptor >> 2 & 1 else 0
        while True:
            block = read(at, 3)
            if len(block) < 3:
                return k, at + 3
            value = int.from_bytes(block, "little")
            kind, nbytes = value >> 1 & 3, value >> 3
            if kind == 3:  # reserved: not a frame
                return k, pos
            at += 3 + (1 if kind == 1 else nbytes)
            if value & 1:
                break
        pos = at + checksum
        if pos > size:
            return k, pos
    return count, pos
