"""`cache-tools split`: assign whole structures to train/val/test, stored in the cache.

Splitting by structure (never by origin) keeps overlapping images of one entry out
of two splits. The assignment is a ``uint8`` code per structure
(``structures/split``) plus the split names in the cache attributes, so the
Dataset reads it as one small memory-mapped array.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cache_tools import format as fmt

SPLIT_NAMES = ("train", "val", "test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", metavar="CACHE")
    p.add_argument("--val", type=float, default=0.0, help="fraction of structures for 'val' (default: 0)")
    p.add_argument("--test", type=float, default=0.0, help="fraction of structures for 'test' (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random assignment (default: 0)")
    p.add_argument("--from-file", action="append", default=[], metavar="NAME=IDS.txt",
                   help="put the structure ids listed in IDS.txt (one per line) in split NAME, e.g. a "
                        "hand-verified validation set; repeatable; the rest is split by --val/--test")
    p.add_argument("--by-date", action="append", default=[], metavar="NAME=YYYY-MM-DD",
                   help="time split: structures deposited on or after the date go to split NAME "
                        "(repeatable: each split runs until the next date), the earlier ones to "
                        "'train', e.g. --by-date val=2021-01-01; replaces --val/--test")


def assign_splits(root: str | Path, val: float = 0.0, test: float = 0.0, seed: int = 0,
                  from_files: dict[str, list[str]] | None = None,
                  by_date: dict[str, str] | None = None) -> dict[str, int]:
    """Write the split assignment; returns structures per split. Unknown listed ids raise."""
    root = Path(root)
    attrs = fmt.read_attrs(root)
    fmt.require_complete(root, attrs)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val {val} and --test {test} must be fractions in [0, 1) summing below 1")
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    ids = [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    position = {sid.lower(): k for k, sid in enumerate(ids)}
    names = list(SPLIT_NAMES)
    codes = np.full(len(ids), 255, dtype=np.uint8)
    for name, listed in (from_files or {}).items():
        if name not in names:
            names.append(name)
        unknown = [sid for sid in listed if sid.lower() not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} ids listed for split {name!r} are not in the cache: "
                             f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        for sid in listed:
            k = position[sid.lower()]
            if codes[k] != 255 and codes[k] != names.index(name):
                raise ValueError(f"structure {sid!r} is listed for two splits")
            codes[k] = names.index(name)
    free = np.flatnonzero(codes == 255)
    if by_date:
        return _write(root, attrs, date_codes(root, codes, names, by_date), names,
                      {"by_date": by_date, "from_files": sorted((from_files or {}).keys())})
    order = free[np.random.default_rng(seed).permutation(len(free))]
    n_val, n_test = round(val * len(ids)), round(test * len(ids))
    codes[order[:n_val]] = names.index("val")
    codes[order[n_val:n_val + n_test]] = names.index("test")
    codes[order[n_val + n_test:]] = names.index("train")
    return _write(root, attrs, codes, names, {"val": val, "test": test, "seed": seed,
                                              "from_files": sorted((from_files or {}).keys())})


def _write(root: Path, attrs: dict, codes: np.ndarray, names: list[str], params: dict) -> dict[str, int]:
    fmt.write_array(root, fmt.STRUCTURE_SPLIT, codes)
    fmt.update_attrs(root, splits=names,
                     metadata_crc32={**attrs.get("metadata_crc32", {}),
                                     fmt.STRUCTURE_SPLIT: fmt.chunk_crc32(root, fmt.STRUCTURE_SPLIT)},
                     split_params=params)
    return {name: int((codes == i).sum()) for i, name in enumerate(names)}


def date_codes(root: Path, codes: np.ndarray, names: list[str], by_date: dict[str, str]) -> np.ndarray:
    """Assign the still-free structures (code 255) by deposition date; undated ones go to 'train'."""
    from cache_tools.structure_meta import StructureColumns, date_to_days

    bounds = []
    for name, text in by_date.items():
        try:
            bounds.append((date_to_days(text), name))
        except ValueError as exc:
            raise ValueError(f"--by-date {name}={text}: {exc}") from None
        if name == "train":
            raise ValueError(f"--by-date {name}={text}: 'train' takes the structures before the first date")
        if name not in names:
            names.append(name)
    bounds.sort()
    deposited = StructureColumns(root).values("deposited")
    free = codes == 255
    codes[free] = names.index("train")
    for (day, name), (stop, _) in zip(bounds, [*bounds[1:], (np.iinfo(np.int64).max, None)]):
        dated = (deposited != fmt.DATE_MISSING) & (deposited >= day) & (deposited < stop)
        codes[free & dated] = names.index(name)
    return codes


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]


def run(args: argparse.Namespace) -> int:
    from_files: dict[str, list[str]] = {}
    try:
        for item in args.from_file:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--from-file {item!r}: expected NAME=FILE")
            try:
                from_files[name] = _read_ids(path)
            except OSError as exc:
                raise ValueError(f"{path}: cannot read id list ({exc.strerror or exc})") from None
        by_date = {}
        for item in args.by_date:
            name, sep, day = item.partition("=")
            if not sep or not name or not day:
                raise ValueError(f"--by-date {item!r}: expected NAME=YYYY-MM-DD")
            by_date[name] = day
        if by_date and (args.val or args.test):
            raise ValueError("--by-date replaces --val/--test; give one or the other")
        counts = assign_splits(args.cache, args.val, args.test, args.seed, from_files, by_date)
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools split: {exc}", file=sys.stderr)
        return 2
    ranges = fmt.read_array(args.cache, fmt.STRUCTURE_ORIGIN_RANGE)
    codes = fmt.read_array(args.cache, fmt.STRUCTURE_SPLIT)
    per = ranges[:, 1] - ranges[:, 0]
    for i, (name, n) in enumerate(counts.items()):
        print(f"{name:>8}: {n} structures, {int(per[codes == i].sum())} origins")
    if args.by_date:
        from cache_tools.structure_meta import StructureColumns
        undated = int((StructureColumns(args.cache).values("deposited") == fmt.DATE_MISSING).sum())
        if undated:
            print(f"{undated} structures have no deposition date; they went to 'train' (or their --from-file split)")
    return 0
