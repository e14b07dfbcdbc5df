#!/usr/bin/env python3
"""Metadata lookups and subset selection at PDB scale, against the same queries in SQLite.

Builds (in --dir) a synthetic cache holding only metadata -- M structures with N origins,
random but realistic metadata columns (the real build writes the same arrays; no voxel
bytes are needed to look things up) -- and an SQLite file of the same table with the
indexes a user would add. Then times, per call, best of --repeat passes:

- ``ds.origins_of_structure(k)``, ``ds.structure_id(k)``, ``ds.structure_meta(k)``,
  ``ds.index_of(origin)`` on a Dataset over a split and a subset (local positions);
- structures matching a column value (``method == 'ELECTRON MICROSCOPY'``), as the
  vectorized mask over the memory-mapped column and as a whole `--where` expression
  (tokenize, parse, type-check, evaluate);
- SQLite: the origins of a structure by id and the structures with a method, indexed.

    python benchmarks/lookups.py --structures 200000 --dir /tmp/lookups
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_tools import VoxelCacheDataset  # noqa: E402
from cache_tools import format as fmt  # noqa: E402
from cache_tools import where  # noqa: E402
from cache_tools.read.structure_meta import StructureColumns  # noqa: E402
from cache_tools.commands.subset import create_subset  # noqa: E402

EM = 1 << fmt.METHODS.index("ELECTRON MICROSCOPY")


def make_cache(root: Path, m: int, per: int, seed: int = 0) -> None:
    """A complete cache's metadata (no shard files): what lookups read."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    n = m * per
    params = {"channels": [["C"]], "image": {"grid_voxels": 1, "resolution_A": 1.0, "atom_radius_A": 0.5},
              "storage": {"dtype": "uint8", "scale": 1.0, "max_abs_error": 0}, "rotations": 1}
    fmt.write_json_atomic(root / "zarr.json", fmt.group_metadata(
        {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "complete": True, "params": params}))
    (root / fmt.VOXELS).mkdir()
    fmt.write_json_atomic(root / fmt.VOXELS / "zarr.json", fmt.voxels_array_metadata(n, (1, 1, 1, 1), "uint8", 4096))
    stops = np.arange(1, m + 1, dtype=np.int64) * per
    fmt.write_array(root, fmt.STRUCTURE_ORIGIN_RANGE, np.stack([stops - per, stops], axis=1))
    fmt.write_array(root, fmt.STRUCTURE_INDEX, np.repeat(np.arange(m, dtype=np.int32), per))
    fmt.write_array(root, fmt.CENTER, np.zeros((n, 3), np.float32))
    fmt.write_array(root, fmt.STRUCTURE_ATOM_COUNT, rng.integers(500, 50000, m).astype(np.int32))
    fmt.write_ragged_strings(root, fmt.STRUCTURE_ID, [f"{k:04x}" for k in range(m)])
    method = np.where(rng.random(m) < 0.8, 1, EM).astype(np.uint16)
    fmt.write_array(root, fmt.STRUCTURE_METHOD, method)
    fmt.write_array(root, fmt.STRUCTURE_RESOLUTION, rng.uniform(0.8, 4.5, m).astype(np.float32))
    fmt.write_array(root, fmt.STRUCTURE_DEPOSITED, rng.integers(5000, 20000, m).astype(np.int32))
    fmt.write_array(root, fmt.STRUCTURE_RELEASED, rng.integers(5000, 20000, m).astype(np.int32))
    fmt.write_array(root, fmt.STRUCTURE_N_MODELS, np.ones(m, np.int32))
    fmt.write_array(root, fmt.STRUCTURE_POLYMER, np.ones(m, np.uint8))
    fmt.write_array(root, fmt.STRUCTURE_N_CHAINS, rng.integers(1, 12, m).astype(np.int32))
    fmt.write_array(root, fmt.STRUCTURE_SPLIT, (rng.random(m) < 0.1).astype(np.uint8))
    fmt.update_attrs(root, splits=("train", "val"))


def make_sqlite(root: Path, db: Path) -> sqlite3.Connection:
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    method = fmt.read_array(root, fmt.STRUCTURE_METHOD)
    res = fmt.read_array(root, fmt.STRUCTURE_RESOLUTION)
    con.execute("CREATE TABLE structures (id INTEGER PRIMARY KEY, name TEXT, method TEXT, resolution REAL)")
    con.execute("CREATE TABLE origins (id INTEGER PRIMARY KEY, structure_id INTEGER)")
    names = {1: "X-RAY DIFFRACTION", EM: "ELECTRON MICROSCOPY"}
    con.executemany("INSERT INTO structures VALUES (?, ?, ?, ?)",
                    ((k, f"{k:04x}", names[int(method[k])], float(res[k])) for k in range(len(ranges))))
    con.executemany("INSERT INTO origins VALUES (?, ?)",
                    ((o, k) for k, (a, b) in enumerate(ranges) for o in range(int(a), int(b))))
    con.executescript("CREATE INDEX s_name ON structures(name); CREATE INDEX s_method ON structures(method);"
                      "CREATE INDEX o_structure ON origins(structure_id);")
    con.commit()
    return con


def per_call(fn, args: list, repeat: int) -> float:
    """Best per-call time over ``repeat`` passes through ``args``, in microseconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for a in args:
            fn(a)
        best = min(best, (time.perf_counter() - t) / len(args))
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structures", type=int, default=200_000)
    p.add_argument("--origins-per-structure", type=int, default=10)
    p.add_argument("--dir", default="lookups-bench")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.dir)
    root = out / "meta.zarr"
    make_cache(root, args.structures, args.origins_per_structure)
    con = make_sqlite(root, out / "meta.sqlite")
    create_subset(root, "em", "method == 'ELECTRON MICROSCOPY' and resolution <= 3.5")
    rng = np.random.default_rng(1)
    train = VoxelCacheDataset(root, split="train", prefetch=False)
    em = VoxelCacheDataset(root, split="train", subset="em", prefetch=False)
    ks = rng.integers(0, em.n_structures, 2000).tolist()
    origins = [em.origin_id(i) for i in rng.integers(0, len(em), 2000).tolist()]
    names = [f"{k:04x}" for k in rng.integers(0, args.structures, 2000).tolist()]
    cols = StructureColumns(root)
    method = cols.values("method")
    rows = {}
    for ds, label in ((train, "split"), (em, "split+subset")):
        ds.origins_of_structure(0), ds.structure_id(0), ds.structure_meta(0)  # open the maps once
        rows[f"ds.origins_of_structure(k) [{label}]"] = per_call(ds.origins_of_structure, ks, args.repeat)
        rows[f"ds.structure_id(k) [{label}]"] = per_call(ds.structure_id, ks, args.repeat)
        rows[f"ds.structure_meta(k) [{label}]"] = per_call(ds.structure_meta, ks, args.repeat)
    rows["ds.index_of(origin) [split+subset]"] = per_call(em.index_of, origins, args.repeat)
    rows[f"rows where method == EM, mask over {args.structures} structures"] = per_call(
        lambda _: np.flatnonzero(method & EM), range(20), args.repeat)
    rows["`--where` expression (parse + check + evaluate), 3 columns"] = per_call(
        lambda _: where.evaluate(where.parse("method == 'ELECTRON MICROSCOPY' and resolution <= 3.5 and "
                                             "deposited < 2020-01-01"), cols), range(20), args.repeat)
    rows["SQLite: origins of a structure by name (indexed)"] = per_call(
        lambda name: con.execute("SELECT o.id FROM origins o JOIN structures s ON s.id = o.structure_id "
                                 "WHERE s.name = ?", (name,)).fetchall(), names, args.repeat)
    rows["SQLite: structures with method = EM (indexed)"] = per_call(
        lambda _: con.execute("SELECT id FROM structures WHERE method = ?", ("ELECTRON MICROSCOPY",)).fetchall(),
        range(20), args.repeat)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{args.structures} structures, {args.structures * args.origins_per_structure} origins; "
              f"subset em: {em.n_structures} structures in train")
        for name, us in rows.items():
            print(f"{us:12.1f} µs  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
