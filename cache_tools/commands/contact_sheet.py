"""The picture `cache-tools show` draws: a contact sheet of rows (an origin's view, or one view of
a pair) x channels, each panel the channel's maximum-intensity projections along x, y and z.

What is drawn is held in :class:`Sheet` (rows of :class:`Shown`: projections, labels, flags), so
tests can check values without looking at pixels; :func:`contact_sheet` turns it into a matplotlib
Figure on the Agg canvas (no pyplot, no display). :mod:`.show` reads the rows from the Dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_tools.read.rotations import FACE_DIRECTIONS

AXES = ("x", "y", "z")
MAX_ROWS = 200          # rows per picture: 200 rows of 4 channels is a 14,560-px-tall PNG, drawn in ~20 s at a
                        # peak RSS of 650 MiB (measured); more are drawn page by page (--page P)


def face_name(label: int) -> str:
    """'+x', '-y', ... : the face ``FACE_DIRECTIONS[label]`` a pair's neighbor lies on."""
    d = FACE_DIRECTIONS[int(label)]
    axis = int(np.flatnonzero(d)[0])
    return ("+" if d[axis] > 0 else "-") + AXES[axis]


def project(image: np.ndarray) -> np.ndarray:
    """Maximum-intensity projections of ``image`` [..., X, Y, Z] along x, y and z.

    Returns [..., 3, L, L]: ``out[..., a, :, :] == image.max(axis=a - 3)``, i.e. a = 0 is
    the (y, z) plane seen along x, a = 1 the (x, z) plane, a = 2 the (x, y) plane.
    """
    image = np.asarray(image)
    return np.stack([image.max(axis=axis) for axis in (-3, -2, -1)], axis=-3)


@dataclass
class Shown:
    """One row of the sheet: an origin's image (a lattice cache: its view) under one cube rotation, or
    one view of a pair (``role`` "home" or "neighbor", ``label`` the face the neighbor lies on),
    with its labels and flags. ``stored_rotation``: the stored rotation, or a lattice's copy."""

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
    role: str = ""                    # "home" / "neighbor" for a pair's views
    label: int | None = None          # a pair's label: its neighbor lies on face FACE_DIRECTIONS[label]
    home_origin: int | None = None    # a pair's home origin (the next one when the asked-for one had no neighbor)

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
    lattice: bool = False
    view_voxels: int = 0
    origin_set: str | None = None     # ids are of this origin set (a lattice cache's `cache-tools origins`)
    pairs: bool = False               # rows are NeighborPairs samples, two rows (home, neighbor) each

    def summary(self, out: str | os.PathLike) -> str:
        """One line: what was drawn (which page of how many) and which origins are flagged."""
        def ids(pred) -> str:
            hit = sorted({r.origin_id for r in self.rows if pred(r)})
            listed = ", ".join(map(str, hit[:8])) + (" ..." if len(hit) > 8 else "")
            return f"{len(hit)}" + (f" ({listed})" if hit else "")
        origins = len({r.origin_id for r in self.rows})
        what = f"{origins} {'pairs' if self.pairs else 'origins'}"
        if self.origin_set is not None:
            what += f" of origin set {self.origin_set!r}"
        if self.lattice:
            what += f", {self.view_voxels}³ views"
        listed = ""
        if self.pairs:
            homes = [r for r in self.rows if r.role == "home" and not r.damaged]
            listed = "; pairs: " + ", ".join(f"{r.origin_id} {r.structure_id} label {r.label} ({face_name(r.label)})"
                                             for r in homes[:8]) + (" ..." if len(homes) > 8 else "")
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
        return (f"{out}: {what}, {len(self.rows)} rows x {len(self.channels)} channels{paged}{listed}; "
                f"flagged: {flags}")


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
                ax.set_ylabel(_row_label(row, sheet), rotation=0, ha="right", va="center",
                              fontsize=7, labelpad=6, color="red" if row.flags else "black",
                              linespacing=1.15)
    for c in range(n_channels):
        cax = fig.add_subplot(bars[0, c], label=f"colorbar:{c}")
        bar = fig.colorbar(images[c], cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=7, length=2)
        bar.ax.xaxis.set_major_locator(MaxNLocator(3))
        bar.set_label(f"ch {c} voxel value", fontsize=7, labelpad=1)
    flagged = sum(bool(r.flags) for r in rows)
    fig.suptitle(f"{Path(sheet.cache).name}: {len({r.origin_id for r in rows})} "
                 f"{'pairs' if sheet.pairs else 'origins'}, {sheet.dtype}, "
                 f"maximum-intensity projections; one colour scale per channel; "
                 + (f"{flagged} flagged rows (red)" if flagged else "nothing flagged"),
                 fontsize=9.5, y=1 - 0.12 / height, va="top")
    fig.text(0.5, 1 - 0.36 / height, "each panel, left to right: along x (y→, z↑) | along y (x→, z↑) | "
             "along z (x→, y↑)", ha="center", va="top", fontsize=7.5, color="0.3")
    return fig


def _row_label(row: Shown, sheet: Sheet) -> str:
    x, y, z = row.center_A
    origin = "origin" if sheet.origin_set is None else f"{sheet.origin_set} #"
    first = f"{origin} {row.origin_id} · {row.structure_id}"
    if row.role == "home":
        first = f"pair {row.origin_id} home · {row.structure_id}" + (
            f" (origin {row.home_origin})" if row.home_origin not in (None, row.origin_id) else "")
    elif row.role == "neighbor":
        first = f"pair {row.origin_id} neighbor" + (f" · label {row.label} ({face_name(row.label)})"
                                                    if row.label is not None else "")
    stored = "copy" if sheet.lattice else "stored rot"
    lines = [first, f"({x:.1f}, {y:.1f}, {z:.1f}) Å",
             f"{stored} {row.stored_rotation} · cube {row.cube_rotation} · {sheet.dtype}"]
    if row.flags:
        lines.append(" · ".join(row.flags))
    return "\n".join(lines)


def render(sheet: Sheet, out: str | os.PathLike) -> None:
    """Draw ``sheet`` and write it to ``out`` (format from the suffix, e.g. .png)."""
    fig = contact_sheet(sheet)
    fig.savefig(out)
