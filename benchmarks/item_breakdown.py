"""Where the microseconds of one ``ds[i]`` go (issue 22, item 3), step by step.

Each step of the per-item path is timed on its own, over the same random origins, best of
many short interleaved passes (warm page cache), next to the whole ``ds[i]``. The steps are
the ones ``VoxelCacheDataset._plain_item`` runs; their sum against the whole says what the
call itself (attribute look-ups, the dict, the frame) costs.

    python benchmarks/item_breakdown.py RAW_FLOAT32_CACHE ZSTD_UINT8_CACHE [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_tools import VoxelCacheDataset  # noqa: E402

import compressed_reads  # noqa: E402  (this folder: the same timing loop)

REPEATS = 60


def best_us(fns: dict, items) -> dict[str, float]:
    return compressed_reads.best_us(fns, items, REPEATS)  # interleaved passes, best of REPEATS


def breakdown(cache: str, dequantize: bool) -> dict:
    ds = VoxelCacheDataset(cache, prefetch=False, dequantize=dequantize)
    ds[0]
    reader, state = ds.reader, ds._state
    shape, dtype, scale = ds.layout.image_shape, ds.image_dtype, ds._scale_out
    compressed = ds.layout.codec is not None
    items = np.random.default_rng(0).integers(0, len(ds), 300).tolist()
    out = np.empty(shape, dtype)
    local = reader._local()

    def empty_tensor(i):
        torch.from_numpy(np.empty(shape, dtype))

    def locate(i):  # raw: the origin's view of its shard map; zstd: its holder and index entry pread
        if compressed:
            holder, end = reader._holder(local, i)
            os.pread(holder.fd, 16, end + 16 * (i % ds.layout.origins_per_shard))
        else:
            reader.view(i)

    def bytes_in(i):  # raw: copy (and cast) the view into the output; zstd: both preads and the decode
        reader.read_into(i, out, scale)

    def metadata(i):
        int(state.structure_index[i])
        torch.from_numpy(state.center[i].copy())

    def sample_dict(i):
        return {"image": out, "origin_id": i, "structure_index": 0, "center_A": out, "rotation": 0,
                "cube_rotation": 0}

    fns = {}
    if compressed:  # the steps inside read_into of a zstd origin (_decode_one)
        from cache_tools.read.native import DecompressionContext
        from cache_tools.read.native import native_decompress as _decompress

        dctx, decompress = DecompressionContext(), _decompress()
        per = ds.layout.origins_per_shard
        frames = {}
        for i in items:
            holder, end = reader._holder(local, i)
            off, length = np.frombuffer(os.pread(holder.fd, 16, end + 16 * (i % per)), "<u8")
            frames[i] = (holder.fd, int(off), int(length), os.pread(holder.fd, int(length), int(off)))

        def holder_lookup(i):
            reader._holder(local, i)

        def index_pread(i):
            fd, _, _, _ = frames[i]
            os.pread(fd, 16, 0)

        def frame_pread(i):
            fd, off, length, _ = frames[i]
            os.pread(fd, length, off)

        def out_pointer(i):
            out.ctypes.data

        def bare_decode(i):
            frame = frames[i][3]
            decompress(dctx.address, address, out.nbytes, frame, len(frame))

        address = out.ctypes.data
        fns = {"  _holder (slot lookup)": holder_lookup, "  index entry pread (16 B)": index_pread,
               "  frame pread": frame_pread, "  out.ctypes.data": out_pointer,
               "  ZSTD_decompressDCtx via ctypes (the codec)": bare_decode}
    steps = best_us({"ds[i]": ds.__getitem__, "np.empty + torch.from_numpy": empty_tensor,
                     "locate": locate, "read_into (locate + copy or decode)": bytes_in,
                     "structure_index + center_A tensor": metadata, "sample dict": sample_dict, **fns},
                    items)
    parts = (steps["np.empty + torch.from_numpy"] + steps["read_into (locate + copy or decode)"]
             + steps["structure_index + center_A tensor"] + steps["sample dict"])
    steps["rest of the call (sum of the steps vs the whole)"] = steps["ds[i]"] - parts
    return {"cache": cache, "dtype": str(ds.layout.dtype), "compressed": compressed,
            "output": str(np.dtype(dtype)), "us": steps}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw_float32")
    p.add_argument("zstd_uint8")
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = [breakdown(args.raw_float32, True), breakdown(args.zstd_uint8, False)]
    for r in results:
        print(f"{r['cache']}: {r['dtype']} {'zstd' if r['compressed'] else 'raw'}, output {r['output']}")
        for k, v in r["us"].items():
            print(f"  {k:52s} {v:7.2f} us")
    print(f"load average: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
