#!/usr/bin/env python3
"""Estimate what caching the whole PDB costs, from figures measured on a sample cache.

Measured here, on the sample cache: origins per structure (mean), bytes per origin
per storage dtype (raw, and compressed with the default codec: each origin one zstd
frame, as `build-cache --compression zstd` stores it), seconds of one core to parse a structure and to voxelize
and encode (crc32, the codec) an origin the way the build does (a lattice cache: whole structures' tiles and crops,
divided by their origins; an --exact-centers cache: one origin at a time). Scaled to ``--entries`` (default 230,000, about the PDB in 2026): origins,
disk per dtype, build core-hours, and page cache for a fully resident cache.

    pipeline build-cache tests/data/mmcif --out sample.zarr
    python workflows/pdb_estimate.py sample.zarr
    pipeline build-cache tests/data/mmcif --out lattice.zarr --layout lattice --dtype uint8
    python workflows/pdb_estimate.py lattice.zarr        # the lattice layout's bytes and build cost

The sample is 12 entries, so treat the result as an order of magnitude: the PDB's
size distribution (many large cryo-EM assemblies) moves the mean, and
``--max-origins-per-structure`` caps the largest entries.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_tools import format as fmt  # noqa: E402
from cache_tools.commands.options import human_bytes  # noqa: E402


def measure(cache: str, sample_origins: int = 200, sample_structures: int = 40) -> dict:
    """Per-structure and per-origin costs on one core, on the cache's own inputs."""
    from pipeline.encode import LatticeEncoder
    from pipeline.parse import parse_atoms
    from pipeline.voxelize import ImageSpec, Storage, voxelize

    params = fmt.read_attrs(cache).params
    spec = ImageSpec(**params.image.to_json())
    ranges = fmt.read_array(cache, fmt.STRUCTURE_ORIGIN_RANGE)
    centers = fmt.read_array(cache, fmt.CENTER)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    assemblies = fmt.assemblies(cache)  # the atoms the build voxelized: assembly and occupancy as built
    parse_s, atoms = [], []
    rng = np.random.default_rng(0)
    measured = np.sort(rng.choice(len(ranges), size=min(sample_structures, len(ranges)), replace=False))
    for k in measured:
        t = time.perf_counter()
        atoms.append(parse_atoms(fmt.ragged_item(*paths, k), [list(c) for c in params.channels], assemblies[k],
                                 params.occupancy))
        parse_s.append(time.perf_counter() - t)
    if params.snapped:  # the build's cost: each structure's tiles, then crops
        mats = fmt.read_array(cache, fmt.ROTATION) if params.rotations > 1 else None
        compress = fmt.encoder(fmt.VoxelLayout(cache).codec)  # the write task's per-origin work too
        t = time.perf_counter()
        for a, k in zip(atoms, measured):
            encoder = LatticeEncoder(a.xyz, a.channel, spec, Storage("float32"), occupancy=a.occupancy)
            run = slice(ranges[k, 0], ranges[k, 1])
            for stored, _ in encoder.encode_many(centers[run].astype(np.float64),
                                                 mats[run] if mats is not None else None):
                zlib.crc32(stored)
                if compress is not None:
                    compress(stored)
        n_measured = int(sum(ranges[k, 1] - ranges[k, 0] for k in measured))
        per_origin = (time.perf_counter() - t) / n_measured / params.rotations  # per image, as below
        return _result(ranges, parse_s, per_origin, cache, params)
    atoms = dict(zip(measured.tolist(), atoms))
    origins = np.concatenate([np.arange(ranges[k, 0], ranges[k, 1]) for k in measured])
    origins = rng.choice(origins, size=min(sample_origins, len(origins)), replace=False)
    structure_of = np.searchsorted(ranges[:, 1], origins, side="right")
    t = time.perf_counter()
    for origin, k in zip(origins, structure_of):
        voxelize(atoms[k].xyz, atoms[k].channel, centers[origin].astype(np.float64), spec,
                 occupancy=atoms[k].occupancy)
    return _result(ranges, parse_s, (time.perf_counter() - t) / len(origins), cache, params)


def measure_lattice(cache: str, sample_structures: int = 40) -> dict:
    """A lattice cache's costs: its bytes per origin (blocks as stored, with the block maps) and
    one core's seconds to parse a structure and to voxelize and encode (crc32, the codec) its
    blocks as the build does, per origin."""
    from pipeline.lattice import LatticeVoxelizer
    from pipeline.parse import parse_atoms
    from pipeline.voxelize import ImageSpec, Storage

    params = fmt.read_attrs(cache).params
    spec, storage = ImageSpec(**params.image.to_json()), Storage(params.storage.dtype, params.storage.uint8_max or 2.0)
    layout = fmt.VoxelLayout(cache, fmt.BLOCKS)
    compress = fmt.encoder(layout.codec)
    ranges = fmt.read_array(cache, fmt.STRUCTURE_ORIGIN_RANGE)
    grid, block_map = fmt.read_array(cache, fmt.LATTICE_GRID), fmt.read_array(cache, fmt.LATTICE_MAP)
    map_start = fmt.read_array(cache, fmt.LATTICE_MAP_START)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    copies = params.rotations
    mats = fmt.read_array(cache, fmt.LATTICE_ROTATION) if copies > 1 else None
    centers = fmt.read_array(cache, fmt.LATTICE_ROTATION_CENTER) if copies > 1 else None
    measured = np.sort(np.random.default_rng(0).choice(len(ranges), size=min(sample_structures, len(ranges)),
                                                       replace=False))
    assemblies = fmt.assemblies(cache)
    parse_s, work_s = [], 0.0
    for k in measured.tolist():
        t = time.perf_counter()
        atoms = parse_atoms(fmt.ragged_item(*paths, k), [list(c) for c in params.channels], assemblies[k],
                            params.occupancy)
        parse_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for copy in range(copies):
            lat = k * copies + copy
            xyz = atoms.xyz if mats is None else fmt.copy_frame(atoms.xyz, mats[k, copy], centers[k], copy)
            voxelizer = LatticeVoxelizer(xyz, atoms.channel, spec, storage, params.lattice.block_edge,
                                         grid[lat, :3], grid[lat, 3:], occupancy=atoms.occupancy)
            for stored, _, _ in voxelizer.blocks(fmt.storage_cells(block_map[map_start[lat]:map_start[lat + 1]])):
                zlib.crc32(stored)
                if compress is not None:
                    compress(stored)
        work_s += time.perf_counter() - t
    n_origins = int(ranges[-1, 1])
    maps = sum(fmt.read_array(cache, name).nbytes for name in
               (fmt.LATTICE_MAP, fmt.LATTICE_GRID, fmt.LATTICE_MAP_START, fmt.LATTICE_BLOCK_START))
    return {"structures": len(ranges), "origins": n_origins,
            "origins_per_structure": float((ranges[:, 1] - ranges[:, 0]).mean()),
            "parse_s_per_structure": float(np.mean(parse_s)),
            "voxelize_s_per_origin": work_s / int(sum(ranges[k, 1] - ranges[k, 0] for k in measured)),
            "bytes_per_origin": (fmt.voxels_nbytes(layout) + maps) / n_origins, "rotations": 1,
            "dtype": params.storage.dtype, "codec": layout.codec.name if layout.codec else "none",
            "load_average": os.getloadavg()[0]}


def _result(ranges, parse_s, voxelize_s, cache, params) -> dict:
    per_origin_values = int(np.prod(fmt.VoxelLayout(cache).image_shape))
    n = int(ranges[-1, 1])
    sample = np.random.default_rng(0).choice(n, size=min(200, n), replace=False)
    return {"compressed_bytes": compressed_bytes(cache, sample),
            "structures": len(ranges), "origins": int(ranges[-1, 1]),
            "origins_per_structure": float((ranges[:, 1] - ranges[:, 0]).mean()),
            "parse_s_per_structure": float(np.mean(parse_s)), "voxelize_s_per_origin": voxelize_s,
            "values_per_origin": per_origin_values, "rotations": params.rotations,
            "load_average": os.getloadavg()[0]}


def compressed_bytes(cache: str, origins: np.ndarray) -> dict[str, float]:
    """Mean stored bytes of these origins per dtype with the default codec (+16 B of shard index each)."""
    from cache_tools.read.reader import ShardReader
    from pipeline.voxelize import Storage

    layout = fmt.VoxelLayout(cache)
    scale = fmt.read_attrs(cache).scale
    reader = ShardReader(layout)
    encode = fmt.encoder(fmt.Codec(fmt.DEFAULT_COMPRESSION, fmt.DEFAULT_COMPRESSION_LEVEL, checksum=True))
    sizes: dict[str, list[int]] = {"float32": [], "float16": [], "uint8": []}
    for origin in origins:
        values = reader.view(int(origin)).astype(np.float32) * np.float32(scale)
        for dtype in sizes:
            sizes[dtype].append(len(encode(Storage(dtype).encode(values)[0].tobytes())) + 16)
    return {dtype: float(np.mean(s)) for dtype, s in sizes.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("--entries", type=int, default=230_000)
    args = p.parse_args(argv)
    lattice = fmt.read_attrs(args.cache).params.layout == "lattice"
    m = measure_lattice(args.cache) if lattice else measure(args.cache)
    n = args.entries * m["origins_per_structure"]
    core_h = args.entries * m["parse_s_per_structure"] / 3600 + n * m["voxelize_s_per_origin"] * m["rotations"] / 3600
    print(f"measured on {m['structures']} sample structures, {m['origins']} origins (one core):")
    print(f"  {m['origins_per_structure']:.0f} origins/structure, {m['parse_s_per_structure'] * 1e3:.0f} ms parse "
          f"per structure, {m['voxelize_s_per_origin'] * 1e3:.1f} ms to voxelize and encode an origin image")
    print(f"\nPDB scale ({args.entries:,} entries, default parameters):")
    print(f"  origins:            {n / 1e6:.1f} M")
    wall_min = core_h / 640 * 60
    print(f"  build:              {core_h:,.0f} core-hours (e.g. {wall_min:.0f} min on 20 nodes x 32 cores, "
          "plus reading the inputs)")
    print(f"                      measured at load average {m['load_average']:.1f} on {os.cpu_count()} cores: "
          "timings grow with machine load, so measure on an idle machine")
    if lattice:
        print(f"  lattice layout ({m['dtype']}, {m['codec']} blocks and block maps): {m['bytes_per_origin']:,.0f} "
              f"bytes/origin measured, {human_bytes(n * m['bytes_per_origin'])} on disk for the PDB: the page cache "
              "to hold it all, shared by every worker and job on a node")
        return 0
    codec = f"{fmt.DEFAULT_COMPRESSION} {fmt.DEFAULT_COMPRESSION_LEVEL}"
    print(f"  on disk = page cache to hold it all; '{codec}' = --compression {fmt.DEFAULT_COMPRESSION} "
          f"--compression-level {fmt.DEFAULT_COMPRESSION_LEVEL}")
    print(f"  | dtype   | bytes/origin | on disk   | {codec} bytes/origin | {codec} on disk |")
    print("  |---------|-------------:|----------:|------------------:|-------------:|")
    for dtype, size in (("float32", 4), ("float16", 2), ("uint8", 1)):
        per = m["values_per_origin"] * size * m["rotations"]
        packed = m["compressed_bytes"][dtype]
        print(f"  | {dtype:<7} | {per:>12,} | {human_bytes(n * per):>9} | {packed:>17,.0f} | "
              f"{human_bytes(n * packed):>12} |")
    print("\nA training job needs page cache only for its working set: with shuffled reads and a cache")
    print("larger than RAM, throughput is bounded by the disk (see BENCHMARKS.md, cold reads).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
