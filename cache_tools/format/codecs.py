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
