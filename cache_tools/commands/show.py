"""`cache-tools show`: origins as pictures, to check by eye what a network will see.

A wrong channel mapping, an origin in empty space, a saturated uint8 scale or a
surprising rotation is obvious in a picture and invisible in a log. Each origin is
drawn as maximum-intensity projections of every channel along x, y and z, from the
very arrays ``VoxelCacheDataset`` returns (:func:`origin_projections`), so the
picture cannot disagree with training. Several origins make a contact sheet with one
colour scale per channel; flagged images (empty, saturated, odd sum) are marked in
the picture and counted in a one-line summary, so ``show`` doubles as a quick audit
of a split.

Reads through the Dataset's public API only (``ds[i]``, ``origin_id``,
``structure_id``, ``origins_of_structure``) plus the cache attributes; draws with
matplotlib's Agg canvas (no pyplot, no display).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.options import positive_int
from cache_tools.read.rotations import N_CUBE_ROTATIONS, rotate_view

AXES = ("x", "y", "z")
SUM_FACTOR = 3.0        # default: flag an image whose sum is > 3x or < 1/3 of its structure's median
MEDIAN_SAMPLE = 256     # a structure's median sum is taken over at most this many of its origins
SATURATED_STORED = 255  # uint8 value of a clipped voxel
MAX_ROWS = 200          # rows per picture: 200 rows of 4 channels is a 14,560-px-tall PNG, drawn in ~20 s at a
                        # peak RSS of 650 MiB (measured); more are drawn page by page (--page P)


# --- what is drawn ---------------------------------------------------------------------

def project(image: np.ndarray) -> np.ndarray:
    """Maximum-intensity projections of ``image`` [..., X, Y, Z] along x, y and z.

    Returns [..., 3, L, L]: ``out[..., a, :, :] == image.max(axis=a - 3)``, i.e. a = 0 is
    the (y, z) plane seen along x, a = 1 the (x, z) plane, a = 2 the (x, y) plane.
    """
    image = np.asarray(image)
    return np.stack([image.max(axis=axis) for axis in (-3, -2, -1)], axis=-3)


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


@dataclass
class Shown:
    """One row of the sheet: an origin under one cube rotation, with its labels and flags."""

    origin_id: int
    structure_id: str
    center_A: tuple[float, float, float]
    stored_rotation: int
    cube_rotation: int
    projections: np.ndarray           # [C, 3, L, L] float32
    image_sum: float
    structure_median: float
    saturated: np.ndarray             # [C] voxels stored as 255 (uint8 caches), else zeros
    flags: list[str] = field(default_factory=list)
    damaged: str | None = None        # why the image could not be read (its projections are NaN)

    @property
    def empty(self) -> bool:
        return self.image_sum == 0.0


@dataclass
class Sheet:
    """Everything the picture shows, so it can be tested without looking at pixels."""

    cache: str
    dtype: str
    channels: list[list[str]]
    rows: list[Shown]
    page: int = 1
    pages: int = 1
    total_rows: int = 0               # rows of every page

    def summary(self, out: str | os.PathLike) -> str:
        """One line: what was drawn (which page of how many) and which origins are flagged."""
        def ids(pred) -> str:
            hit = sorted({r.origin_id for r in self.rows if pred(r)})
            listed = ", ".join(map(str, hit[:8])) + (" ..." if len(hit) > 8 else "")
            return f"{len(hit)}" + (f" ({listed})" if hit else "")
        origins = len({r.origin_id for r in self.rows})
        damaged = [r for r in self.rows if r.damaged]
        flags = ((f"damaged {ids(lambda r: r.damaged)} (run cache-tools check); " if damaged else "")
                 + f"empty {ids(lambda r: r.empty)}; "
                 + (f"saturated {ids(lambda r: r.saturated.any())}; " if self.dtype == "uint8" else "")
                 + f"sum far from structure median {ids(lambda r: any(f.startswith('sum') for f in r.flags))}")
        paged = ""
        if self.pages > 1:
            first = (self.page - 1) * MAX_ROWS + 1
            paged = (f" (page {self.page} of {self.pages}: rows {first}-{first + len(self.rows) - 1} of "
                     f"{self.total_rows}, at most {MAX_ROWS} per picture; --page P draws the others)")
        return (f"{out}: {origins} origins, {len(self.rows)} rows x {len(self.channels)} channels{paged}; "
                f"flagged: {flags}")


def _read(ds, index: int) -> dict | str:
    """``ds[index]``, or why it cannot be read (a damaged origin: its checksum, its shard file)."""
    try:
        return ds[int(index)]
    except fmt.CacheError as exc:
        return str(exc).removeprefix(f"{ds.root}: ")


def _structure_medians(ds, structures: set[int]) -> dict[int, float]:
    """Median image sum of each structure, over at most MEDIAN_SAMPLE evenly spaced origins
    (damaged ones left out: NaN when none can be read)."""
    medians = {}
    for k in sorted(structures):
        ids = np.asarray(ds.origins_of_structure(k))
        if len(ids) > MEDIAN_SAMPLE:
            ids = ids[np.linspace(0, len(ids) - 1, MEDIAN_SAMPLE).round().astype(np.int64)]
        samples = (_read(ds, i) for i in ids)
        sums = [float(s["image"].numpy().sum()) for s in samples if isinstance(s, dict)]  # numpy: torch's sum is ~100x slower
        medians[k] = float(np.median(sums)) if sums else float("nan")
    return medians


def check_sum_factor(sum_factor: float) -> None:
    """ValueError unless ``sum_factor`` is a finite number above 1 (nan would flag every image)."""
    if not (isinstance(sum_factor, (int, float)) and math.isfinite(sum_factor) and sum_factor > 1):
        raise ValueError(f"--sum-factor {sum_factor}: must be a finite number above 1")


def collect(cache: str | os.PathLike, origin_ids: Sequence[int] = (), split: str | None = None,
            random: int = 0, seed: int = 0, rotate: int | str | None = None,
            sum_factor: float = SUM_FACTOR, page: int = 1) -> Sheet:
    """Read and flag what the sheet shows.

    Origins are ``origin_ids`` (global ids), or ``random`` of them drawn with ``seed``
    from ``split`` (or the whole cache). ``rotate`` is a cube rotation 0..23 applied to
    every origin, ``"all"`` for one row per rotation, or None (0). At most MAX_ROWS rows are
    read and drawn: page ``page`` (1, 2, ...) of them. Every image read is checked against its
    crc32: a damaged one is a DAMAGED row (NaN projections), the others are drawn. Raises
    ValueError or CacheError with a one-line message for ids, splits, rotations and pages that
    do not exist.
    """
    from cache_tools.read.dataset import VoxelCacheDataset

    check_sum_factor(sum_factor)
    root = str(cache)
    attrs = fmt.read_attrs(root)
    ds = VoxelCacheDataset(root, verify=True)  # whole cache, no augmentation: index = origin id
    n = len(ds)
    ids = [int(i) for i in origin_ids]
    if random:
        if random < 0:
            raise ValueError(f"--random {random}: must be a positive number of origins")
        pool = VoxelCacheDataset(root, split=split) if split is not None else ds
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
        raise ValueError(f"{root}: origin id {bad[0]} does not exist (the cache holds ids 0-{n - 1})")
    if rotate is None:
        cubes = [0]
    elif rotate == "all":
        cubes = list(range(N_CUBE_ROTATIONS))
    elif isinstance(rotate, int) and 0 <= rotate < N_CUBE_ROTATIONS:
        cubes = [rotate]
    else:
        raise ValueError(f"--rotate {rotate}: expected a cube rotation 0-{N_CUBE_ROTATIONS - 1} or 'all'")

    wanted = [(i, cube) for i in ids for cube in cubes]
    pages = -(-len(wanted) // MAX_ROWS)
    if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= pages:
        raise ValueError(f"--page {page}: the sheet has {pages} page(s) of at most {MAX_ROWS} rows "
                         f"({len(wanted)} rows)")
    wanted = wanted[(page - 1) * MAX_ROWS:page * MAX_ROWS]
    samples = {i: _read(ds, i) for i in dict.fromkeys(i for i, _ in wanted)}
    medians = _structure_medians(ds, {int(s["structure_index"]) for s in samples.values() if isinstance(s, dict)})
    saturation = (np.float32(SATURATED_STORED - 0.5) * np.float32(attrs.scale)
                  if attrs.params.storage.dtype == "uint8" else None)
    index = fmt.read_array(root, fmt.STRUCTURE_INDEX)
    centers = fmt.read_array(root, fmt.CENTER)
    rows = []
    for i, cube in wanted:
        if not isinstance(samples[i], dict):  # damaged: say so, draw the others
            k, length = int(index[i]), int(ds.view_voxels)
            rows.append(Shown(origin_id=i, structure_id=ds.structure_id(k),
                              center_A=tuple(float(c) for c in centers[i]), stored_rotation=0, cube_rotation=cube,
                              projections=np.full((len(ds.channels), 3, length, length), np.nan, np.float32),
                              image_sum=float("nan"), structure_median=medians.get(k, float("nan")),
                              saturated=np.zeros(len(ds.channels), np.int64), flags=["DAMAGED"],
                              damaged=samples[i]))
            continue
        projections = project(rotate_view(samples[i]["image"].numpy(), int(cube)))
        sample = samples[i]
        image = sample["image"].numpy()
        total = float(image.sum())
        k = int(sample["structure_index"])
        saturated = ((image >= saturation).sum(axis=(1, 2, 3)) if saturation is not None
                     else np.zeros(len(image), dtype=np.int64))
        flags = []
        if total == 0.0:
            flags.append("EMPTY")
        elif medians[k] > 0 and not medians[k] / sum_factor <= total <= medians[k] * sum_factor:  # NaN: False
            flags.append(f"sum {total / medians[k]:.2g}x median")
        if saturated.any():
            flags.append(f"{int(saturated.sum())} saturated")
        rows.append(Shown(origin_id=i, structure_id=ds.structure_id(k),
                          center_A=tuple(float(c) for c in sample["center_A"]),
                          stored_rotation=int(sample["rotation"]), cube_rotation=cube,
                          projections=projections, image_sum=total,
                          structure_median=medians[k], saturated=saturated, flags=flags))
    return Sheet(cache=root, dtype=attrs.params.storage.dtype, channels=ds.channels, rows=rows, page=page,
                 pages=pages, total_rows=len(ids) * len(cubes))


# --- drawing ---------------------------------------------------------------------------

def _channel_title(c: int, elements: list[str]) -> str:
    name = "|".join(elements)
    return f"ch {c}: {'* (other)' if name == '*' else name}"


def _strip(projections: np.ndarray) -> np.ndarray:
    """The three [L, L] projections of one channel side by side, one NaN column apart, as
    imshow rows (vertical, drawn upwards) x columns: along x: y->, z^; along y: x->, z^;
    along z: x->, y^."""
    length = projections.shape[-1]
    gap = np.full((length, 1), np.nan, dtype=np.float32)
    return np.concatenate([projections[0].T, gap, projections[1].T, gap, projections[2].T], axis=1)


def contact_sheet(sheet: Sheet):
    """A matplotlib Figure (Agg canvas): one panel per row x channel, plus a colour bar per channel.

    Each panel holds the channel's projections along x, y, z; every panel of a channel
    shares that channel's colour scale (0 to the sheet's maximum). Panels are labelled
    ``panel:<row>:<channel>``; flagged rows get a red frame and their flags in the label.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows, n_channels = sheet.rows, len(sheet.channels)
    length = rows[0].projections.shape[-1]
    stack = np.stack([r.projections for r in rows])            # [rows, C, 3, L, L]; NaN: damaged
    vmax = np.where(np.isnan(stack), -np.inf, stack).max(axis=(0, 2, 3, 4))
    vmax = np.where(vmax > 0, vmax, 1.0)
    row_h, panel_w, label_w, top_h, bottom_h = 0.72, 2.2, 2.3, 0.85, 0.75
    height = row_h * len(rows) + top_h + bottom_h
    fig = Figure(figsize=(label_w + panel_w * n_channels, height), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), n_channels, left=label_w / (label_w + panel_w * n_channels),
                            right=0.985, top=1 - top_h / height, bottom=bottom_h / height,
                            hspace=0.12, wspace=0.06)
    bars = fig.add_gridspec(1, n_channels, left=label_w / (label_w + panel_w * n_channels), right=0.985,
                            top=0.5 / height, bottom=0.38 / height, wspace=0.06)
    cmap = "magma"
    images = [None] * n_channels
    for r, row in enumerate(rows):
        for c in range(n_channels):
            ax = fig.add_subplot(grid[r, c], label=f"panel:{r}:{c}")
            images[c] = ax.imshow(_strip(row.projections[c]), origin="lower", cmap=cmap, vmin=0.0,
                                  vmax=float(vmax[c]), interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                for a, axis in enumerate(AXES):
                    ax.text((a * (length + 1) + (length - 1) / 2) / (3 * length + 1), 1.03,
                            f"along {axis}", transform=ax.transAxes, ha="center",
                            va="bottom", fontsize=6.5, color="0.3")
            ax.set_facecolor("white")
            bad = row.flags and (row.empty or any(not f.endswith("saturated") for f in row.flags)
                                 or row.saturated[c])
            for spine in ax.spines.values():
                spine.set_color("red" if bad else "0.6")
                spine.set_linewidth(2.0 if bad else 0.5)
            if row.damaged and c == 0:
                ax.text(0.5, 0.5, "DAMAGED: not drawn (run cache-tools check)", transform=ax.transAxes,
                        ha="center", va="center", fontsize=6.5, color="red", fontweight="bold")
            if row.saturated[c]:
                ax.text(0.99, 0.96, f"{int(row.saturated[c])} sat", transform=ax.transAxes, ha="right",
                        va="top", fontsize=6.5, color="red", fontweight="bold",
                        bbox=dict(facecolor="white", alpha=0.75, pad=0.5, linewidth=0))
            if r == 0:
                ax.set_title(_channel_title(c, sheet.channels[c]), fontsize=9, pad=13)
            if c == 0:
                ax.set_ylabel(_row_label(row, sheet.dtype), rotation=0, ha="right", va="center",
                              fontsize=7, labelpad=6, color="red" if row.flags else "black",
                              linespacing=1.15)
    for c in range(n_channels):
        cax = fig.add_subplot(bars[0, c], label=f"colorbar:{c}")
        bar = fig.colorbar(images[c], cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=7, length=2)
        bar.ax.xaxis.set_major_locator(MaxNLocator(3))
        bar.set_label(f"ch {c} voxel value", fontsize=7, labelpad=1)
    flagged = sum(bool(r.flags) for r in rows)
    fig.suptitle(f"{Path(sheet.cache).name}: {len({r.origin_id for r in rows})} origins, {sheet.dtype}, "
                 f"maximum-intensity projections; one colour scale per channel; "
                 + (f"{flagged} flagged rows (red)" if flagged else "nothing flagged"),
                 fontsize=9.5, y=1 - 0.12 / height, va="top")
    fig.text(0.5, 1 - 0.36 / height, "each panel, left to right: along x (y→, z↑) | along y (x→, z↑) | "
             "along z (x→, y↑)", ha="center", va="top", fontsize=7.5, color="0.3")
    return fig


def _row_label(row: Shown, dtype: str) -> str:
    x, y, z = row.center_A
    lines = [f"origin {row.origin_id} · {row.structure_id}",
             f"({x:.1f}, {y:.1f}, {z:.1f}) Å",
             f"stored rot {row.stored_rotation} · cube {row.cube_rotation} · {dtype}"]
    if row.flags:
        lines.append(" · ".join(row.flags))
    return "\n".join(lines)


def render(sheet: Sheet, out: str | os.PathLike) -> None:
    """Draw ``sheet`` and write it to ``out`` (format from the suffix, e.g. .png)."""
    fig = contact_sheet(sheet)
    fig.savefig(out)


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
    p.epilog = ("One row per origin (per cube rotation with --rotate all), one panel per channel: its "
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
                        rotate=args.rotate, sum_factor=args.sum_factor, page=args.page)
        render(sheet, out)
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools show: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cache-tools show: {out}: cannot write the picture ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(sheet.summary(out))
    return 1 if any(r.damaged for r in sheet.rows) else 0
