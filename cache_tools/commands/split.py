"""`cache-tools split`: assign whole entries to train/val/test, stored in the cache.

Splitting by structure (never by origin) keeps overlapping images of one structure out
of two splits, and structures of one PDB entry (``structures/entry_id``, e.g. ``1qjg``
and ``1qjg_clean``) or with byte-identical sources go to the same split: a group is
assigned as a whole. Sequence-identity clustering is the user's to supply, as
``--from-file`` lists. The assignment is a ``uint8`` code per structure
(``structures/split``) plus the split names in the cache attributes, so the Dataset
reads it as one small memory-mapped array.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.options import fraction, non_negative_int

SPLIT_NAMES = ("train", "val", "test")
BALANCE = ("structures", "origins")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Exit codes: 0 done; 1 the split could not be written (a full disk, a read-only cache: the previous "
                "split is kept, or the cache then has none; its images are intact); 2 a bad option or split name, a "
                "split given twice, a split that would get no structure, or a cache that cannot be read.")
    p.add_argument("cache", metavar="CACHE")
    p.add_argument("--val", type=fraction, default=0.0, help="fraction for 'val' (default: 0)")
    p.add_argument("--test", type=fraction, default=0.0, help="fraction for 'test' (default: 0)")
    p.add_argument("--balance", choices=BALANCE, default="structures",
                   help="what the fractions count: structures, or origins (samples) (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random assignment (default: 0)")
    p.add_argument("--from-file", action="append", default=[], metavar="NAME=IDS.txt",
                   help="put the structure ids listed in IDS.txt (one per line) in split NAME, e.g. a "
                        "hand-verified validation set or your sequence-identity clusters; repeatable; "
                        "the rest is split by --val/--test")
    p.add_argument("--by-date", action="append", default=[], metavar="NAME=YYYY-MM-DD",
                   help="time split: structures deposited on or after the date go to split NAME "
                        "(repeatable: each split runs until the next date), the earlier ones to "
                        "'train', e.g. --by-date val=2021-01-01; replaces --val/--test")


def group_structures(root: str | Path) -> np.ndarray:
    """Group number of each structure: structures of one entry id, or with identical
    source content, share a group (numbered by first appearance)."""
    entries = fmt.entry_ids(root)
    sha = fmt.read_array(root, fmt.STRUCTURE_SHA256)
    parent = list(range(len(entries)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for keys in (entries, [bytes(row) for row in sha]):
        first: dict = {}
        for k, key in enumerate(keys):
            j = first.setdefault(key, k)
            a, b = find(j), find(k)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(k) for k in range(len(entries))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def compute_splits(root: str | Path, val: float = 0.0, test: float = 0.0, seed: int = 0,
                   from_files: dict[str, list[str]] | None = None,
                   balance: str = "structures",
                   by_date: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """(split names, uint8 code per structure), without writing anything.

    Groups (see :func:`group_structures`) are shuffled with ``seed`` and filled in
    order; a group goes to the split its middle falls in, weighing each group by its
    structures or its origins (``balance``); ``by_date`` assigns them by deposition
    date instead (:func:`date_codes`). Raises ValueError for unknown listed ids,
    a group listed for two splits, or a requested split that would be empty.
    """
    root = Path(root)
    attrs = fmt.read_attrs(root)
    fmt.require_complete(root, attrs)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val {val} and --test {test} must be fractions in [0, 1) summing below 1")
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    ids = [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    weight = (ranges[:, 1] - ranges[:, 0]) if balance == "origins" else np.ones(len(ids), np.int64)
    group = group_structures(root)
    position = {sid.lower(): k for k, sid in enumerate(ids)}
    names = list(SPLIT_NAMES)
    codes = np.full(len(ids), 255, dtype=np.uint8)
    for name, listed in (from_files or {}).items():
        fmt.check_name("split", name)  # the rule subsets and origin sets follow (ValueError)
        if name not in names:
            names.append(name)
        if not listed:
            raise ValueError(f"the id list for split {name!r} is empty")
        unknown = [sid for sid in listed if sid.lower() not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} ids listed for split {name!r} are not in the cache: "
                             f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        for sid in listed:
            k = position[sid.lower()]
            if codes[k] != 255 and codes[k] != names.index(name):
                raise ValueError(f"structure {sid!r} is listed for two splits")
            codes[k] = names.index(name)
    # A listed structure takes its whole group along (same entry, same content).
    for g in np.unique(group[codes != 255]):
        members = np.flatnonzero(group == g)
        listed = set(codes[members].tolist()) - {255}
        if len(listed) > 1:
            raise ValueError(f"structures {', '.join(ids[k] for k in members)} are one entry (or identical "
                             f"files) but are listed for splits {', '.join(names[c] for c in sorted(listed))}")
        codes[members] = listed.pop()
    if by_date:
        codes = date_codes(root, codes, names, by_date)
        for name, day in by_date.items():
            if not (codes == names.index(name)).any():
                raise ValueError(f"--by-date {name}={day} gives split {name!r} no structures (the cache's "
                                 f"structures: {date_range(root)})")
        return names, codes
    free_groups = np.unique(group[codes == 255])
    order = free_groups[np.random.default_rng(seed).permutation(len(free_groups))]
    group_weight = np.bincount(group, weights=weight, minlength=int(group.max(initial=-1)) + 1)
    middle = np.cumsum(group_weight[order]) - group_weight[order] / 2
    total = float(weight.sum())
    target = np.where(middle < val * total, names.index("val"),
                      np.where(middle < (val + test) * total, names.index("test"), names.index("train")))
    codes_of_group = np.full(len(group_weight), 255, dtype=np.uint8)
    codes_of_group[order] = target
    free = codes == 255
    codes[free] = codes_of_group[group[free]]
    for name, fraction_ in (("val", val), ("test", test)):
        if fraction_ > 0 and not (codes == names.index(name)).any():
            raise ValueError(f"--{name} {fraction_} gives split {name!r} no structures ({len(ids)} structures "
                             f"in {len(group_weight)} entries, {int(total)} {balance}); use a larger "
                             "fraction or --from-file")
    return names, codes


def assign_splits(root: str | Path, val: float = 0.0, test: float = 0.0, seed: int = 0,
                  from_files: dict[str, list[str]] | None = None, balance: str = "structures",
                  by_date: dict[str, str] | None = None) -> dict[str, int]:
    """Write the split assignment into the cache, crash-safely (:func:`format.replace_arrays`: a
    failure leaves the previous split, or none); returns structures per split."""
    names, codes = compute_splits(root, val, test, seed, from_files, balance, by_date)
    listed = {"from_files": sorted(from_files)} if from_files else {}
    params = ({"by_date": by_date, **listed} if by_date else
              {"val": val, "test": test, "seed": seed, "balance": balance, "from_files": sorted(from_files or {})})
    fmt.replace_arrays(
        root, {fmt.STRUCTURE_SPLIT: codes},
        forget=lambda a: a.replace(splits=(), split_params=None, metadata_crc32={
            k: v for k, v in a.metadata_crc32.items() if k != fmt.STRUCTURE_SPLIT}),
        name=lambda a, crcs: a.replace(splits=tuple(names), split_params=params,
                                       metadata_crc32={**a.metadata_crc32, **crcs}))
    return {name: int((codes == i).sum()) for i, name in enumerate(names)}


def recreate_command(root: str | os.PathLike, params: dict | None) -> str:
    """The `cache-tools split` command that made a split recorded with ``params`` (``split_params``)."""
    head = f"cache-tools split {root}"
    lists = " ".join(f"--from-file {name}=IDS.txt" for name in (params or {}).get("from_files") or ())
    if not params:
        return f"{head} ... (the options you split it with)"
    if "origins_file" in params:  # the build took it from an --origins file's split column
        return (f"{head} --from-file NAME=IDS.txt ... (each split's ids of the split column of the build's "
                f"--origins file {params['origins_file']})")
    if "by_date" in params:
        return " ".join([head, *(f"--by-date {name}={day}" for name, day in params["by_date"].items()), lists]).strip()
    return (f"{head} --val {params.get('val', 0)} --test {params.get('test', 0)} --seed {params.get('seed', 0)} "
            f"--balance {params.get('balance', 'structures')} {lists}").strip() + \
        (" (IDS.txt: the id lists you gave)" if lists else "")


def date_codes(root: Path, codes: np.ndarray, names: list[str], by_date: dict[str, str]) -> np.ndarray:
    """Assign the still-free structures (code 255) by deposition date; undated ones go to 'train'."""
    from cache_tools.read.structure_meta import StructureColumns

    bounds = []
    for name, text in by_date.items():
        fmt.check_name("split", name)  # the rule subsets and origin sets follow (ValueError)
        try:
            bounds.append((fmt.date_to_days(text), name))
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


def date_range(root: Path) -> str:
    """'deposited 1995-03-24 .. 2009-01-21, 1 undated' of the cache's structures, for messages."""
    from cache_tools.read.structure_meta import StructureColumns

    deposited = StructureColumns(root).values("deposited")
    dated = deposited[deposited != fmt.DATE_MISSING]
    undated = len(deposited) - len(dated)
    text = (f"deposited {fmt.days_to_date(dated.min())} .. {fmt.days_to_date(dated.max())}" if len(dated)
            else "no structure has a deposition date")
    return text + (f", {undated} undated" if undated and len(dated) else "")


def named_values(option: str, items: list[str], what: str) -> dict[str, str]:
    """{NAME: VALUE} of repeated ``option NAME=VALUE`` arguments; ValueError for a malformed item,
    a bad name, or a name given twice (a split has one id list and one start date)."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} {item!r}: expected NAME={what}")
        fmt.check_name("split", name)
        if name in values:
            raise ValueError(f"{option} {item!r}: split {name!r} is already given ({option} {name}={values[name]}); "
                             f"give each split once")
        values[name] = value
    return values


def write_failure(exc: OSError, before: fmt.CacheAttrs | None, root: str, what: str,
                  holds: Callable[[fmt.CacheAttrs], bool]) -> str:
    """'No space left on device (PATH); nothing was changed': a failed write of a split or subset
    (``what``, which the attributes hold when ``holds(attrs)``) and what it left, in a few words."""
    error = f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
    try:
        now = fmt.read_attrs(root)
    except fmt.CacheError:
        now = None
    if before is None or now == before:
        return f"{error}; nothing was changed"
    if now is not None and not holds(now):
        return (f"{error}; the cache now has no {what} (its images and other data are intact): free space and rerun "
                "the command")
    return f"{error}; the new {what} is stored, but may not survive a power loss: rerun the command"


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]


def run(args: argparse.Namespace) -> int:
    from_files: dict[str, list[str]] = {}
    before = None
    try:
        before = fmt.read_attrs(args.cache)
        for name, path in named_values("--from-file", args.from_file, "FILE").items():
            try:
                from_files[name] = _read_ids(path)
            except OSError as exc:
                raise ValueError(f"{path}: cannot read id list ({exc.strerror or exc})") from None
            if not from_files[name]:
                raise ValueError(f"--from-file {f'{name}={path}'!r}: {path} lists no ids")
        by_date = named_values("--by-date", args.by_date, "YYYY-MM-DD")
        if by_date and (args.val or args.test):
            raise ValueError("--by-date replaces --val/--test; give one or the other")
        counts = assign_splits(args.cache, args.val, args.test, args.seed, from_files, args.balance, by_date)
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools split: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only cache: staged first, so the old split or none
        print(f"cache-tools split: cannot write the split into {args.cache}: "
              f"{write_failure(exc, before, args.cache, 'split', lambda a: bool(a.splits))}", file=sys.stderr)
        return 1
    ranges = fmt.read_array(args.cache, fmt.STRUCTURE_ORIGIN_RANGE)
    codes = fmt.read_array(args.cache, fmt.STRUCTURE_SPLIT)
    per = ranges[:, 1] - ranges[:, 0]
    groups = group_structures(args.cache)
    shared = int((np.bincount(groups) > 1).sum())
    for i, (name, n) in enumerate(counts.items()):
        print(f"{name:>8}: {n} structures, {int(per[codes == i].sum())} origins "
              f"({100 * per[codes == i].sum() / max(1, per.sum()):.0f}% of origins)")
        if n == 0 and name == "train":
            print("cache-tools split: warning: split 'train' is empty", file=sys.stderr)
    if shared:
        print(f"  kept together: {shared} entries with more than one structure (same entry id or content)")
    if args.by_date:
        from cache_tools.read.structure_meta import StructureColumns
        undated = int((StructureColumns(args.cache).values("deposited") == fmt.DATE_MISSING).sum())
        if undated:
            print(f"{undated} structures have no deposition date; they went to 'train' (or their --from-file split)")
    return 0
