"""The two "seed" loaders: what users train from today, rebuilt faithfully for comparison.

Both are map-style torch Datasets that parse mmCIF files with gemmi and voxelize each
sample on the fly with macromol_voxelize's public API (a polars DataFrame of atoms into
``image_from_atoms``), keeping a per-worker dict of parsed structures (path -> Atoms)
as people add to avoid re-parsing. They differ only in where the per-origin metadata
lives, which is the variable the loader memory benchmark turns:

* :class:`SeedInitialDataset` -- a pandas DataFrame built in the main process (paths and
  tags as Python ``str`` objects, floats for x, y, z, weight), read with ``.iloc`` in
  the workers. Forked workers share it copy-on-write, and every row they read has its
  objects' reference counts written, which copies the page under it (copy-on-read).
* :class:`SeedSqliteDataset` -- the usual fix: the metadata in an SQLite file (integer
  ids, indexed), the connection opened lazily in each worker, one query per item.

Both return what :class:`cache_tools.VoxelCacheDataset` returns for the same origin id:
``{"image": float32 tensor [C, L, L, L], "origin_id": int}`` (same image parameters,
read from the cache's attributes), so all loaders do the same work for the caller.

The metadata is made from a cache's own origins (:func:`origin_table`), one row per
origin; for sizes beyond the cache, rows repeat the shared structures under distinct
tags (``rows > n_origins``).
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import macromol_voxelize as mmvox
import torch

from cache_tools import format as fmt
from pipeline.parse import Atoms, parse_atoms

__all__ = ["ImageParams", "image_params", "origin_table", "SeedInitialDataset", "SeedSqliteDataset",
           "write_sqlite"]


class ImageParams:
    """Image parameters of a cache (grid, resolution, radius, channels), picklable."""

    def __init__(self, grid_voxels: int, resolution_A: float, atom_radius_A: float,
                 channels: list[list[str]]) -> None:
        self.grid_voxels = grid_voxels
        self.resolution_A = resolution_A
        self.atom_radius_A = atom_radius_A
        self.channels = channels


def image_params(cache: str | os.PathLike) -> ImageParams:
    """The parameters the cache was built with, so the seeds make the same images."""
    params = fmt.read_attrs(cache).params
    return ImageParams(params.image.grid_voxels, float(params.image.resolution_A),
                       float(params.image.atom_radius_A), [list(c) for c in params.channels])


def origin_table(cache: str | os.PathLike, rows: int | None = None) -> dict[str, np.ndarray]:
    """Per-origin metadata of ``cache`` as numpy columns (what the seed loaders index).

    Columns: ``origin_id`` (int64), ``path`` (str: the structure's source file), ``x``,
    ``y``, ``z`` (float64 centre, Å), ``tag`` (a distinct str per row), ``weight``
    (float64). With ``rows`` larger than the cache, origins repeat in order under
    distinct tags ("metadata may repeat the shared structures under distinct tags").
    """
    center = fmt.read_array(cache, fmt.CENTER)
    structure = fmt.read_array(cache, fmt.STRUCTURE_INDEX)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    ids = fmt.read_ragged_strings(cache, fmt.STRUCTURE_ID)
    n = len(center)
    rows = n if rows is None else int(rows)
    origin = np.arange(rows, dtype=np.int64) % n
    path_of = [fmt.ragged_item(*paths, k) for k in range(len(fmt.read_array(cache, fmt.STRUCTURE_ATOM_COUNT)))]
    id_of = [fmt.ragged_item(*ids, k) for k in range(len(path_of))]
    s = structure[origin]
    return {
        "origin_id": origin,
        "path": np.array([path_of[k] for k in s], dtype=object),
        "x": center[origin, 0].astype(np.float64),
        "y": center[origin, 1].astype(np.float64),
        "z": center[origin, 2].astype(np.float64),
        "tag": np.array([f"{id_of[k]}/origin-{o:07d}/copy-{r // n}" for r, (k, o) in enumerate(zip(s, origin))],
                        dtype=object),
        "weight": np.linspace(0.5, 1.5, rows),
    }


class _OnTheFly(torch.utils.data.Dataset):
    """Parse + voxelize per item, with the per-worker structure cache people add."""

    def __init__(self, image: ImageParams, voxelize: bool = True) -> None:
        self.image = image
        self.voxelize = voxelize   # False: metadata lookups only (isolates their copy-on-read)
        self._structures: dict[str, Atoms] = {}   # filled in each worker, per process

    def _atoms(self, path: str) -> Atoms:
        atoms = self._structures.get(path)
        if atoms is None:
            atoms = self._structures[path] = parse_atoms(path, self.image.channels)
        return atoms

    def _voxelize(self, path: str, center: np.ndarray) -> torch.Tensor:
        if not self.voxelize:
            L = self.image.grid_voxels
            return torch.zeros((len(self.image.channels), L, L, L))
        atoms = self._atoms(path)
        df = pl.DataFrame({"x": atoms.xyz[:, 0], "y": atoms.xyz[:, 1], "z": atoms.xyz[:, 2],
                           "channels": [[int(c)] for c in atoms.channel]}).with_columns(
            radius_A=self.image.atom_radius_A)
        grid = mmvox.Grid(self.image.grid_voxels, self.image.resolution_A, center)
        img, _ = mmvox.image_from_atoms(df, mmvox.ImageParams(channels=len(self.image.channels), grid=grid))
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))


class SeedInitialDataset(_OnTheFly):
    """Origins in a pandas DataFrame; ``.iloc`` per item, parse + voxelize on the fly.

    The DataFrame is built here, in the main process, and forked into every worker.
    """

    def __init__(self, cache: str | os.PathLike, rows: int | None = None, voxelize: bool = True) -> None:
        super().__init__(image_params(cache), voxelize)
        table = origin_table(cache, rows)
        self.df = pd.DataFrame({"path": table["path"].tolist(), "x": table["x"], "y": table["y"],
                                "z": table["z"], "tag": table["tag"].tolist(), "weight": table["weight"],
                                "origin_id": table["origin_id"]})

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.df.iloc[index]
        center = np.array([row["x"], row["y"], row["z"]], dtype=np.float64)
        return {"image": self._voxelize(row["path"], center), "origin_id": int(row["origin_id"])}


def write_sqlite(cache: str | os.PathLike, db_path: str | os.PathLike, rows: int | None = None) -> Path:
    """Write the origins of ``cache`` to an SQLite file the way the SQLite seed expects.

    Tables: ``structures(id INTEGER PRIMARY KEY, path TEXT)``, ``tags(id INTEGER
    PRIMARY KEY, tag TEXT)``, ``origins(id INTEGER PRIMARY KEY, origin_id, structure_id,
    tag_id, x, y, z, weight)`` with indexes on the integer ids.
    """
    table = origin_table(cache, rows)
    db_path = Path(db_path)
    tmp = db_path.with_name(db_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript("""
            CREATE TABLE structures (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
            CREATE TABLE tags (id INTEGER PRIMARY KEY, tag TEXT NOT NULL);
            CREATE TABLE origins (id INTEGER PRIMARY KEY, origin_id INTEGER NOT NULL,
                                  structure_id INTEGER NOT NULL REFERENCES structures(id),
                                  tag_id INTEGER NOT NULL REFERENCES tags(id),
                                  x REAL NOT NULL, y REAL NOT NULL, z REAL NOT NULL, weight REAL NOT NULL);
        """)
        paths = sorted(set(table["path"].tolist()))
        path_id = {p: k for k, p in enumerate(paths)}
        con.executemany("INSERT INTO structures VALUES (?, ?)", enumerate(paths))
        con.executemany("INSERT INTO tags VALUES (?, ?)", enumerate(table["tag"].tolist()))
        con.executemany("INSERT INTO origins VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
            (i, int(o), path_id[p], i, float(x), float(y), float(z), float(w))
            for i, (o, p, x, y, z, w) in enumerate(zip(table["origin_id"], table["path"], table["x"],
                                                       table["y"], table["z"], table["weight"]))))
        con.executescript("CREATE INDEX origins_tag ON origins(tag_id);"
                          "CREATE INDEX origins_structure ON origins(structure_id);")
        con.commit()
    finally:
        con.close()
    os.replace(tmp, db_path)
    return db_path


class SeedSqliteDataset(_OnTheFly):
    """Origins in SQLite, one indexed query per item, the connection opened in each worker.

    Nothing per origin lives in Python; what each worker still grows is the on-the-fly
    part (parsed structures, voxelizing) and SQLite's own page cache.
    """

    QUERY = ("SELECT s.path, o.x, o.y, o.z, o.origin_id FROM origins o "
             "JOIN structures s ON s.id = o.structure_id WHERE o.id = ?")

    def __init__(self, cache: str | os.PathLike, db_path: str | os.PathLike, voxelize: bool = True) -> None:
        super().__init__(image_params(cache), voxelize)
        self.db_path = str(db_path)
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            (self._len,) = con.execute("SELECT COUNT(*) FROM origins").fetchone()
        finally:
            con.close()
        self._con: sqlite3.Connection | None = None
        self._pid: int | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None or self._pid != os.getpid():   # never use a connection across fork
            self._con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False)
            self._pid = os.getpid()
        return self._con

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_con"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._connection().execute(self.QUERY, (int(index),)).fetchone()
        if row is None:
            raise IndexError(f"index {index} out of range for {self._len} origins")
        path, x, y, z, origin = row
        return {"image": self._voxelize(path, np.array([x, y, z], dtype=np.float64)), "origin_id": int(origin)}
