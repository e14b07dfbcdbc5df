"""Which codec for one origin per inner chunk? Size and decode time of zarr-native codecs.

Each origin compressed on its own (as `build-cache --compression` stores it), on 300 random
origins of each given cache (uncompressed or not: the stored image is what is compressed).
Decode time is the bare numcodecs call into a reused buffer, best of 3 passes.

    python benchmarks/codec_choice.py sample-uint8.zarr sample-float32.zarr
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, zstd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_tools import format as fmt  # noqa: E402
from cache_tools.read.reader import ShardReader  # noqa: E402


def main(caches: list[str]) -> None:
    for cache in caches:
        layout = fmt.VoxelLayout(cache)
        reader = ShardReader(layout)
        ids = np.random.default_rng(0).choice(layout.n_origins, min(300, layout.n_origins), replace=False)
        images = [reader.view(int(o)).copy() for o in ids]
        raw = sum(a.nbytes for a in images)
        out = np.empty_like(images[0])
        codecs = {f"zstd level {lv} (+checksum)": (zstd.Zstd(level=lv, checksum=True), True) for lv in (1, 3, 5)}
        for lv in (1, 3):
            for name, shuffle in (("shuffle", Blosc.SHUFFLE), ("bitshuffle", Blosc.BITSHUFFLE)):
                codecs[f"blosc zstd {lv} {name}"] = (Blosc("zstd", lv, shuffle), False)
        codecs["blosc lz4 5 shuffle"] = (Blosc("lz4", 5, Blosc.SHUFFLE), False)
        print(f"{cache}: {layout.dtype.name} {list(layout.image_shape)}, {len(images)} origins, "
              f"{images[0].nbytes} B raw each")
        for name, (codec, is_zstd) in codecs.items():
            encoded = [codec.encode(a) for a in images]
            size = sum(len(e) for e in encoded)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for e in encoded:
                    zstd.decompress(e, out) if is_zstd else codec.decode(e, out)
                best = min(best, (time.perf_counter() - t) / len(encoded) * 1e6)
            print(f"  {name:<26} {raw / size:6.2f}x smaller, {size / len(encoded):8.0f} B/origin, "
                  f"decode {best:6.1f} us")
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for a in images:
                np.copyto(out, a)
            best = min(best, (time.perf_counter() - t) / len(images) * 1e6)
        print(f"  {'raw copy':<26} {'1.00':>6}x, {images[0].nbytes:8d} B/origin, copy   {best:6.1f} us")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
