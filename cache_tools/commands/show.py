"""`cache-tools show`: origins as pictures, to check by eye what a network will see.

A wrong channel mapping, an origin in empty space, a saturated uint8 scale or a
surprising rotation is obvious in a picture and invisible in a log. Each origin is
drawn as maximum-intensity projections of every channel along x, y and z, from the
very arrays ``VoxelCacheDataset`` returns (:func:`origin_projections`), so the
picture cannot disagree with training. Several origins make a contact sheet with one
colour scale per channel; flagged images (empty, saturated, odd sum, damaged) are marked
in the picture and counted in a one-line summary, so ``show`` doubles as a quick audit
of a split.

On a lattice cache the rows are the views a Dataset cuts: of any size (``grid_voxels``),
at the build's origins or an origin set's (``origins``), or the home and neighbor views of
``NeighborPairs`` (``pairs``), each pair's label (the face its neighbor lies on) in its rows.

Reads through the Datasets' public API (``ds[i]``, ``index_of``, ``structure_id``,
``local_structure``, ``origins_of_structure``) plus the cache attributes, and, for a damaged
origin that cannot be read, its structure and centre from the cache's arrays; draws with
:mod:`.contact_sheet`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.contact_sheet import MAX_ROWS, Sheet, Shown, contact_sheet, project, render
from cache_tools.commands.options import positive_int
from cache_tools.read.rotations import N_CUBE_ROTATIONS, rotate_view

__all__ = ["MAX_ROWS", "Sheet", "Shown", "collect", "contact_sheet", "origin_projections", "project", "render"]

SUM_FACTOR = 3.0        # default: flag an image whose sum is > 3x or < 1/3 of its structure's median
MEDIAN_SAMPLE = 256     # a structure's median sum is taken over at most this many of its origins
SATURATED_STORED = 255  # uint8 value of a clipped voxel


# --- what is drawn ---------------------------------------------------------------------

def origin_projections(ds, origin_id: int, cube_rotation: int = 0) -> tuple[np.ndarray, dict]:
    """Projections [C, 3, L, L] of origin ``origin_id`` under cube rotation ``cube_rotation``.

    ``ds`` is a ``VoxelCacheDataset`` over the whole cache (no split, ``rotate=False``),
    so sample index = origin id; the image is the one ``ds[origin_id]`` returns, turned
    by :func:`cache_tools.read.rotations.rotate_view` exactly as ``rotate=True`` does. Also
    returns the sample (its image unrotated) for labels and flags.
    """
    sample = ds[int(origin_id)]
    image = sample["image"].numpy()
    return project(rotate_view(image, int(cube_rotation))), sample


def _read(ds, index: int) -> dict | str:
    """``ds[index]``, or why it cannot be read (a damaged origin: its checksum, its shard file)."""
    try:
        return ds[int(index)]
    except fmt.CacheError as exc:
        return str(exc).removeprefix(f"{ds.root}: ")


def _structure_medians(ds, rows: set[int]) -> dict[int, float]:
    """Median image sum of each structure (global ``rows``), over at most MEDIAN_SAMPLE evenly
    spaced samples of ``ds`` (damaged ones left out: NaN when none can be read)."""
    medians = {}
    for row in sorted(rows):
        ids = np.asarray(ds.origins_of_structure(ds.local_structure(row)))
        if len(ids) > MEDIAN_SAMPLE:
            ids = ids[np.linspace(0, len(ids) - 1, MEDIAN_SAMPLE).round().astype(np.int64)]
        samples = (_read(ds, i) for i in ids)
        sums = [float(s["image"].numpy().sum()) for s in samples if isinstance(s, dict)]  # numpy: torch's sum is ~100x slower
        medians[row] = float(np.median(sums)) if sums else float("nan")
    return medians


def check_sum_factor(sum_factor: float) -> None:
    """ValueError unless ``sum_factor`` is a finite number above 1 (nan would flag every image)."""
    if not (isinstance(sum_factor, (int, float)) and math.isfinite(sum_factor) and sum_factor > 1):
        raise ValueError(f"--sum-factor {sum_factor}: must be a finite number above 1")


def _cubes(rotate: int | str | None, pairs: bool) -> list[int]:
    if pairs and rotate is not None:
        raise ValueError("--rotate: each pair is drawn under the cube rotation NeighborPairs chose for it "
                         "(the one that puts its neighbor on the face its label names)")
    if rotate is None:
        return [0]
    if rotate == "all":
        return list(range(N_CUBE_ROTATIONS))
    if isinstance(rotate, int) and 0 <= rotate < N_CUBE_ROTATIONS:
        return [rotate]
    raise ValueError(f"--rotate {rotate}: expected a cube rotation 0-{N_CUBE_ROTATIONS - 1} or 'all'")


def _datasets(root: str, attrs: fmt.CacheAttrs, grid_voxels: int | None, origins: str | None, pairs: bool,
              seed: int):
    """(the Dataset the rows come from, the plain one the medians come from), checksums verified."""
    from cache_tools.read.dataset import VoxelCacheDataset

    lattice = attrs.params.lattice is not None
    if not lattice and grid_voxels == attrs.params.image.grid_voxels:
        grid_voxels = None  # the stored images' own size
    if not lattice and (grid_voxels is not None or origins is not None or pairs):
        flag = "--pairs" if pairs else "--origins" if origins is not None else "--grid-voxels"
        raise ValueError(f"{root}: {flag} needs views cut at training time, and this cache stores one image per "
                         "origin; build it with `pipeline build-cache --layout lattice`")
    views = {"grid_voxels": grid_voxels, "origins": origins} if lattice else {}
    plain = VoxelCacheDataset(root, verify=True, **views)  # no augmentation: the views as stored
    if not pairs:
        return plain, plain
    from cache_tools.read.pairs import NeighborPairs

    return NeighborPairs(root, verify=True, seed=seed, **views), plain


def collect(cache: str | os.PathLike, origin_ids: Sequence[int] = (), split: str | None = None,
            random: int = 0, seed: int = 0, rotate: int | str | None = None,
            sum_factor: float = SUM_FACTOR, page: int = 1, grid_voxels: int | None = None,
            origins: str | None = None, pairs: bool = False) -> Sheet:
    """Read and flag what the sheet shows.

    Origins are ``origin_ids`` (global ids: of the cache, or of origin set ``origins``), or
    ``random`` of them drawn with ``seed`` from ``split`` (or the whole cache). ``rotate`` is a
    cube rotation 0..23 applied to every origin, ``"all"`` for one row per rotation, or None (0).
    A lattice cache's views are ``grid_voxels`` wide (default: the build's grid); ``pairs``
    draws each origin's ``NeighborPairs`` sample (seeded by ``seed``) as two rows, home and
    neighbor. At most MAX_ROWS rows are read and drawn: page ``page`` (1, 2, ...) of them.
    Every image read is checked against its crc32: a damaged one is a DAMAGED row (NaN
    projections), the others are drawn. Raises ValueError or CacheError with a one-line message
    for ids, splits, rotations, pages and options that do not exist or do not apply.
    """
    check_sum_factor(sum_factor)
    root = str(cache)
    attrs = fmt.read_attrs(root)
    cubes = _cubes(rotate, pairs)
    ds, plain = _datasets(root, attrs, grid_voxels, origins, pairs, seed)
    n = plain.n_origins  # ids are global: of the cache, or of the origin set
    ids = [int(i) for i in origin_ids]
    if random:
        if random < 0:
            raise ValueError(f"--random {random}: must be a positive number of origins")
        pool = type(plain)(root, split=split, **({"origins": origins} if origins is not None else {})) \
            if split is not None else plain
        if len(pool) == 0:
            raise ValueError(f"{root}: split {split!r} holds no origins")
        picks = np.random.default_rng(seed).choice(len(pool), size=min(random, len(pool)), replace=False)
        ids += sorted(pool.origin_id(int(i)) for i in picks)
    elif split is not None:
        raise ValueError("--split chooses where --random draws from; give --random N with it")
    if not ids:
        raise ValueError("no origins to show: give ORIGIN_ID... or --random N")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        where = "the cache holds ids" if origins is None else f"origin set {origins!r} holds ids"
        raise ValueError(f"{root}: origin id {bad[0]} does not exist ({where} 0-{n - 1})")

    per_row = 2 if pairs else 1
    wanted = [(i, cube) for i in ids for cube in cubes]
    total_rows = len(wanted) * per_row
    pages = -(-total_rows // MAX_ROWS)
    if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= pages:
        raise ValueError(f"--page {page}: the sheet has {pages} page(s) of at most {MAX_ROWS} rows "
                         f"({total_rows} rows)")
    wanted = wanted[(page - 1) * MAX_ROWS // per_row:page * MAX_ROWS // per_row]
    samples = {i: _read(ds, ds.index_of(i)) for i in dict.fromkeys(i for i, _ in wanted)}
    medians = _structure_medians(plain, {int(s["structure_index"]) for s in samples.values()
                                         if isinstance(s, dict)})
    saturation = (np.float32(SATURATED_STORED - 0.5) * np.float32(attrs.scale)
                  if attrs.params.storage.dtype == "uint8" else None)
    index = fmt.read_array(root, plain._index_array)
    centers = fmt.read_array(root, plain._center_array)
    n_channels, length = len(plain.channels), int(plain.view_voxels)
    rows = []
    for i, cube in wanted:
        sample = samples[i]
        if not isinstance(sample, dict):  # damaged: say so, draw the others
            k = int(index[i])
            for role in (("home", "neighbor") if pairs else ("",)):
                rows.append(Shown(origin_id=i, structure_id=plain.structure_id(plain.local_structure(k)),
                                  center_A=tuple(float(c) for c in centers[i]), stored_rotation=0,
                                  cube_rotation=cube,
                                  projections=np.full((n_channels, 3, length, length), np.nan, np.float32),
                                  image_sum=float("nan"), structure_median=medians.get(k, float("nan")),
                                  saturated=np.zeros(n_channels, np.int64), flags=["DAMAGED"], damaged=sample,
                                  role=role))
            continue
        k = int(sample["structure_index"])
        views = [(sample["image"][v].numpy(), sample["center_A"][v], role)
                 for v, role in enumerate(("home", "neighbor"))] if pairs else \
            [(sample["image"].numpy(), sample["center_A"], "")]
        for image, center, role in views:
            total = float(image.sum())
            saturated = ((image >= saturation).sum(axis=(1, 2, 3)) if saturation is not None
                         else np.zeros(len(image), dtype=np.int64))
            flags = []
            if total == 0.0:
                flags.append("EMPTY")
            elif medians[k] > 0 and not medians[k] / sum_factor <= total <= medians[k] * sum_factor:  # NaN: False
                flags.append(f"sum {total / medians[k]:.2g}x median")
            if saturated.any():
                flags.append(f"{int(saturated.sum())} saturated")
            rows.append(Shown(origin_id=i, structure_id=plain.structure_id(plain.local_structure(k)),
                              center_A=tuple(float(c) for c in center), stored_rotation=int(sample["rotation"]),
                              cube_rotation=int(sample["cube_rotation"]) if pairs else cube,
                              projections=project(image if pairs else rotate_view(image, int(cube))),
                              image_sum=total, structure_median=medians[k], saturated=saturated, flags=flags,
                              role=role, label=int(sample["label"]) if pairs else None,
                              home_origin=int(sample["origin_id"]) if pairs else None))
    return Sheet(cache=root, dtype=attrs.params.storage.dtype, channels=plain.channels, rows=rows, page=page,
                 pages=pages, total_rows=total_rows, lattice=attrs.params.lattice is not None,
                 view_voxels=length, origin_set=origins, pairs=pairs)


# --- command line ----------------------------------------------------------------------

def _rotation(text: str) -> int | str:
    if text == "all":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k < N_CUBE_ROTATIONS:
        raise argparse.ArgumentTypeError(f"expected a cube rotation 0-{N_CUBE_ROTATIONS - 1} or 'all', got {text!r}")
    return k


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("One row per origin (per cube rotation with --rotate all; on a lattice cache, per view, two "
                "per pair with --pairs), one panel per channel: its "
                "maximum-intensity projections along x, y and z, one colour scale per channel. Flagged "
                "in red and in the one-line summary on stdout: empty images, voxels saturated at the "
                "uint8 maximum, image sums far from their structure's median, and DAMAGED images (checksum "
                f"verified; the others are drawn). At most {MAX_ROWS} rows per picture (--page). Exit codes: "
                "0 written; 1 written, with damaged images flagged; 2 bad ids, split, option or --out, or a "
                "cache that cannot be read.")
    p.add_argument("cache", metavar="CACHE", help="path of the zarr store")
    p.add_argument("origin_ids", metavar="ORIGIN_ID", type=int, nargs="*", help="origin ids to show")
    p.add_argument("--out", required=True, metavar="FILE.png", help="picture to write (PNG; .svg/.pdf work too)")
    p.add_argument("--split", metavar="NAME", help="draw --random origins from this split only")
    p.add_argument("--random", type=int, default=0, metavar="N", help="show N origins drawn at random")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default: 0)")
    p.add_argument("--rotate", type=_rotation, metavar="K|all",
                   help="show each origin under cube rotation K (0-23, as rotate=True applies them), "
                        "or one row per rotation with 'all'")
    p.add_argument("--sum-factor", type=float, default=SUM_FACTOR, metavar="F",
                   help="flag images whose sum is above F times or below 1/F of their structure's "
                        "median; a finite number above 1 (default: %(default)s)")
    p.add_argument("--page", type=positive_int, default=1, metavar="P",
                   help=f"a picture holds at most {MAX_ROWS} rows; draw page P of them (default: %(default)s)")
    g = p.add_argument_group("lattice caches (--layout lattice): the views cut at training time")
    g.add_argument("--grid-voxels", type=positive_int, default=None, metavar="N",
                   help="views of N voxels per side, as VoxelCacheDataset(grid_voxels=N) cuts them (default: "
                        "the build's grid)")
    g.add_argument("--origins", metavar="NAME", default=None,
                   help="views at the centres of origin set NAME (`cache-tools origins`); ORIGIN_IDs are its ids")
    g.add_argument("--pairs", action="store_true",
                   help="draw each origin's NeighborPairs sample (seeded by --seed): its home and neighbor "
                        "views as two rows, the label (the face the neighbor lies on) in the label and summary")


def picture_path(out: str) -> Path:
    """The file the picture goes to: ``out``, with ``.png`` added when it has no suffix (as
    matplotlib does), so the summary names the file that exists. ValueError for an empty name."""
    if not out.strip():
        raise ValueError(f"--out {out!r}: give the name of the picture to write (e.g. sheet.png)")
    path = Path(out)
    return path.with_name(path.name + ".png") if not path.suffix and not path.is_dir() else path


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{path}: cannot write the picture (is a directory)")
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot write the picture (directory {parent} does not exist)")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{path}: cannot write the picture (permission denied)")


def run(args: argparse.Namespace) -> int:
    out = args.out
    try:
        check_sum_factor(args.sum_factor)
        out = picture_path(args.out)
        _check_writable(out)
        sheet = collect(args.cache, args.origin_ids, split=args.split, random=args.random, seed=args.seed,
                        rotate=args.rotate, sum_factor=args.sum_factor, page=args.page,
                        grid_voxels=args.grid_voxels, origins=args.origins, pairs=args.pairs)
        render(sheet, out)
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools show: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cache-tools show: {out}: cannot write the picture ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(sheet.summary(out))
    return 1 if any(r.damaged for r in sheet.rows) else 0
