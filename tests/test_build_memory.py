"""A ribosome-size entry (211k atoms, 290 Å across) builds with bounded worker memory."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cache_tools import format as fmt
from pipeline.build import build_cache
from pipeline.encode import TILE_BYTES, OriginEncoder
from pipeline.parse import parse_atoms

from conftest import DATA, small_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from make_assembly import make_assembly  # noqa: E402

MiB = 2**20


def test_ribosome_size_entry_builds_with_bounded_worker_memory(tmp_path):
    made = make_assembly(tmp_path / "big.cif", DATA / "3v4i.cif.gz", (3, 2, 2))
    assert made["atoms"] > 200_000 and max(made["extent_A"]) > 280
    params = small_params(dtype="uint8", grid=21, max_origins=200)
    small = build_cache([str(DATA / "1aa5.cif.gz")], tmp_path / "small.zarr", params, workers=1, progress=False)
    big = build_cache([str(tmp_path / "big.cif")], tmp_path / "big.zarr", params, workers=1, progress=False)
    assert big.origins == 200 and big.failures == []
    # The whole bounding box as one float32 grid would be 4 x 290 x 282 x 255 x 4 bytes = 318 MiB;
    # the write phase holds one tile (<= TILE_BYTES, 64 MiB) beside the atoms and one shard's stream.
    peak, base = big.peak_worker_rss_bytes, small.peak_worker_rss_bytes
    print(f"peak worker RSS, 211k-atom entry: scan {peak['scan'] / MiB:.0f} MiB, voxelize "
          f"{peak['voxelize'] / MiB:.0f} MiB; 1aa5: scan {base['scan'] / MiB:.0f}, voxelize {base['voxelize'] / MiB:.0f}")
    assert 0 < peak["voxelize"] - base["voxelize"] < TILE_BYTES + 64 * MiB
    assert 0 < peak["scan"] - base["scan"] < 400 * MiB  # gemmi's parse of a 15 MB mmCIF: ~230 MiB
    assert fmt.read_attrs(tmp_path / "big.zarr").build["peak_worker_rss_bytes"] == peak
    # and the images are right: a few origins against the per-origin reference
    atoms = parse_atoms(tmp_path / "big.cif", params.channels)
    reference = OriginEncoder(atoms.xyz, atoms.channel, params.image, params.storage)
    centers = fmt.read_array(tmp_path / "big.zarr", fmt.CENTER)
    layout = fmt.VoxelLayout(tmp_path / "big.zarr")
    for origin in np.linspace(0, big.origins - 1, 5).astype(int):
        shard, offset = layout.locate(int(origin))
        with open(layout.shard_path(shard), "rb") as fh:
            fh.seek(offset)
            assert fh.read(layout.origin_nbytes) == reference.encode(centers[origin])[0]
