#!/usr/bin/env python3
"""Turn a macromol_gym training database into an ``--origins`` file for `pipeline build-cache`.

    python workflows/from_macromol_gym.py train.sqlite --out origins.csv
    pipeline build-cache $PDB_MMCIF_FILES --origins origins.csv --occupancy weight --out cache.zarr

macromol_gym (``mmg_pick_training_examples`` + ``mmg_split_training_examples``) curates
*zones*: cube centres on a 10 Å lattice of a biological assembly, kept when dense enough
and non-redundant across sequence clusters, with train/val/test splits assigned to
whole structures by cluster. This script reads its SQLite database with the standard
``sqlite3`` module and numpy only (macromol_gym is not needed; schema: ``init_db`` in their
``database_io.py``) and writes one CSV row per zone::

    structure_id,x,y,z,split,assembly
    3fy3,17.979001748,-24.015734339,-22.792027383,test,1

- ``structure_id``: ``structure.pdb_id`` (lower-case, e.g. ``3fy3``): the id the build gives
  a file named ``3fy3.cif.gz``, so point the build at the PDB's mmCIF files.
- ``x,y,z``: ``zone.center_A`` (their ``np.save`` bytes, float64), in Å in the frame of the
  assembly's atoms, i.e. the mmCIF's Cartesian frame with the assembly's operators applied,
  which is the frame of the build's ``--assembly`` atoms. Their samplers draw a view origin
  uniformly inside the zone's cube; the cache stores one image centred on the zone centre
  (snapped to the image lattice unless ``--exact-centers``).
- ``split``: ``split.name`` of the structure; the build stores it as ``cache-tools split``
  does, so ``VoxelCacheDataset(cache, split="val")`` works at once. A database whose
  structures have no split yet gets no split column; one where only some have one is refused.
- ``assembly``: ``assembly.pdb_id`` (``_pdbx_struct_assembly.id``), the assembly the zone was
  picked on. A cache holds one assembly per structure: when a structure has zones in more
  than one assembly (macromol_gym adds a later-ranked assembly only for molecules the first
  lacks), the zones of its first assembly are kept and the others are counted on stderr.

The build voxelizes each file's first model; ``structure.model_id`` other than 1 is counted
on stderr. To match their images, build with ``--occupancy weight`` (every alternate
conformer, weighted by occupancy, as their ``image_from_atoms`` does); the assembly column
already selects their atoms.

Exit codes: 0 written; 2 the database cannot be read or is not a macromol_gym database.
"""
from __future__ import annotations

import argparse
import csv
import io
import sqlite3
import sys
from pathlib import Path

import numpy as np

TABLES = ("structure", "assembly", "zone", "split")

QUERY = """
    SELECT zone.id, zone.center_A, assembly.id, assembly.pdb_id, structure.pdb_id, structure.model_id,
           split.name
    FROM zone
    JOIN assembly ON assembly.id = zone.assembly_id
    JOIN structure ON structure.id = assembly.struct_id
    LEFT JOIN split ON split.id = structure.split_id
    ORDER BY structure.id, assembly.id, zone.id
"""


class ConvertError(Exception):
    """The database cannot be converted; str() is the one-line reason."""


def vector(blob: bytes, zone_id: int) -> np.ndarray:
    """A ``VECTOR_3D`` value: their adapter writes ``np.save`` bytes of a float64 (3,) array."""
    try:
        v = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, TypeError) as exc:
        raise ConvertError(f"zone {zone_id}: center_A is not np.save bytes ({exc})") from None
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ConvertError(f"zone {zone_id}: center_A is {v!r}, expected 3 finite numbers")
    return v.astype(np.float64)


def read_zones(db_path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """(one dict per kept zone: structure_id, center, split, assembly, zone_id; counts of what was
    left out or is worth saying). Raises ConvertError."""
    path = Path(db_path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            present = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in TABLES if t not in present]
            if missing:
                raise ConvertError(f"{path}: not a macromol_gym training database (no table {missing[0]!r})")
            rows = db.execute(QUERY).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise ConvertError(f"{path}: cannot read as SQLite ({exc})") from None
    zones, first_assembly = [], {}
    counts = {"zones": len(rows), "later_assembly_zones": 0, "structures_other_model": 0, "no_split": 0}
    seen_model: set[str] = set()
    for zone_id, blob, assembly_row, assembly_id, pdb_id, model_id, split in rows:
        sid = str(pdb_id).lower()
        if first_assembly.setdefault(sid, assembly_row) != assembly_row:
            counts["later_assembly_zones"] += 1
            continue
        if sid not in seen_model:
            seen_model.add(sid)
            counts["structures_other_model"] += str(model_id) != "1"
            counts["no_split"] += split is None
        zones.append({"structure_id": sid, "center": vector(blob, zone_id), "split": split,
                      "assembly": str(assembly_id), "zone_id": zone_id})
    if counts["no_split"] and counts["no_split"] != len(seen_model):
        raise ConvertError(f"{path}: {counts['no_split']} of {len(seen_model)} structures have no split "
                           "(a database is split as a whole by mmg_split_training_examples)")
    return zones, counts


def write_origins(zones: list[dict], out: str | Path) -> None:
    """The CSV `pipeline build-cache --origins` reads (header row, coordinates exact: repr of float64)."""
    with_split = bool(zones) and zones[0]["split"] is not None
    columns = ["structure_id", "x", "y", "z"] + (["split"] if with_split else []) + ["assembly"]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(columns)
        for z in zones:
            w.writerow([z["structure_id"], *(repr(float(c)) for c in z["center"])]
                       + ([z["split"]] if with_split else []) + [z["assembly"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Then: pipeline build-cache FILES --origins OUT --occupancy weight ...")
    parser.add_argument("database", metavar="DB.sqlite", help="a macromol_gym training database (mmg_init)")
    parser.add_argument("--out", required=True, metavar="ORIGINS.csv", help="the --origins file to write")
    args = parser.parse_args(argv)
    try:
        zones, counts = read_zones(args.database)
    except ConvertError as exc:
        print(f"from_macromol_gym: {exc}", file=sys.stderr)
        return 2
    if not zones:
        print(f"from_macromol_gym: {args.database}: no zones (was mmg_pick_training_examples run?)", file=sys.stderr)
        return 2
    try:
        write_origins(zones, args.out)
    except OSError as exc:
        print(f"from_macromol_gym: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    structures: dict[str, str | None] = {}
    for z in zones:
        structures.setdefault(z["structure_id"], z["split"])
    if counts["later_assembly_zones"]:
        print(f"from_macromol_gym: {counts['later_assembly_zones']} zones on structures' later assemblies left "
              "out (a cache holds one assembly per structure: the first)", file=sys.stderr)
    if counts["structures_other_model"]:
        print(f"from_macromol_gym: {counts['structures_other_model']} structures were picked on a model other "
              "than 1; the build voxelizes each file's first model", file=sys.stderr)
    per_split = {}
    for z in zones:
        per_split[z["split"]] = per_split.get(z["split"], 0) + 1
    splits = ", ".join(f"{name} {n}" for name, n in per_split.items()) if None not in per_split else "none"
    print(f"{args.out}: {len(zones)} origins (zone centres) of {len(structures)} structures; "
          f"zones per split: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
