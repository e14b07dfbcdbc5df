"""`cache-tools subset`: named selections of structures by metadata, stored in the cache.

    cache-tools subset CACHE xray25 --where "method == 'X-RAY DIFFRACTION' and resolution <= 2.5"
    cache-tools subset CACHE            # list the stored subsets

A subset is the sorted int32 array of the structure rows its expression selected
(``structures/subset/<NAME>``), plus the expression and counts in the cache
attributes. ``VoxelCacheDataset(cache, subset=NAME)`` reads that array (:mod:`cache_tools.read.selection`) (and intersects
it with ``split=``); the expression grammar is in :mod:`cache_tools.read.where`.
Stored crash-safely (:func:`cache_tools.format.replace_arrays`): a failure leaves the previous
subset of that name, or none, and ``cache-tools check`` names the command that recreates a
damaged one (:func:`recreate_command`).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.split import write_failure
from cache_tools.read import where
from cache_tools.read.structure_meta import COLUMNS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Exit codes: 0 done; 1 the subset could not be written (a full disk, a read-only cache: the previous "
                "subset of that name is kept, or the cache then has none; its other data intact); 2 a bad expression "
                "or name, nothing matched, or a cache that cannot be read.")
    p.add_argument("cache", metavar="CACHE")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="subset to create or replace; without NAME, list the stored subsets")
    p.add_argument("--where", metavar="EXPR",
                   help="selection, e.g. \"method == 'X-RAY DIFFRACTION' and resolution <= 2.5 and "
                        "deposited < 2020-01-01\"; columns: " + ", ".join(COLUMNS)
                        + "; operators == != < <= > >= in, and/or/not, parentheses")
    p.add_argument("--delete", action="store_true", help="remove subset NAME")


def create_subset(root: str | Path, name: str, expression: str) -> dict[str, int]:
    """Evaluate ``expression`` and store the rows as subset ``name``; returns its counts.

    Raises ExpressionError (bad expression), CacheError (bad cache, no metadata) or
    ValueError (bad name, nothing matched).
    """
    root = Path(root)
    attrs = fmt.read_attrs(root)
    fmt.require_complete(root, attrs)
    array = fmt.subset_array(name)
    rows = where.select(root, expression).astype(np.int32)
    if len(rows) == 0:
        raise ValueError(f"--where {expression!r} matches no structure; subset {name!r} not stored")
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    record = fmt.SubsetRecord(expression, int(len(rows)), int((ranges[rows, 1] - ranges[rows, 0]).sum()))
    fmt.replace_arrays(root, {array: rows}, forget=lambda a: forget(a, name),  # a failure: the old subset, or none
                       name=lambda a, crcs: a.replace(subsets={**a.subsets, name: record},
                                                      metadata_crc32={**a.metadata_crc32, **crcs}))
    return {"structures": record.structures, "origins": record.origins}


def forget(attrs: fmt.CacheAttrs, name: str) -> fmt.CacheAttrs:
    """``attrs`` without subset ``name`` (its files, if any, are then ignored)."""
    array = fmt.subset_array(name)
    return attrs.replace(subsets={k: v for k, v in attrs.subsets.items() if k != name},
                         metadata_crc32={k: v for k, v in attrs.metadata_crc32.items() if k != array})


def recreate_command(root: str | os.PathLike, name: str, record: fmt.SubsetRecord) -> str:
    """The `cache-tools subset` command that made subset ``name``."""
    return f"cache-tools subset {root} {name} --where {shlex.quote(record.where)}"


def delete_subset(root: str | Path, name: str) -> None:
    root = Path(root)
    attrs = fmt.read_attrs(root)
    if name not in attrs.subsets:
        raise ValueError(f"no subset named {name!r} (stored: {', '.join(attrs.subsets) or 'none'})")
    fmt.update_attrs(root, lambda a: forget(a, name))  # forget it first, then remove the files
    shutil.rmtree(root / fmt.subset_array(name), ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    before = None
    try:
        if args.name is None:
            if args.where is not None or args.delete:
                raise ValueError("give a subset NAME with --where or --delete")
            subsets = fmt.read_attrs(args.cache).subsets
            for name, s in subsets.items():
                print(f"{name}: {s.structures} structures, {s.origins} origins where {s.where}")
            if not subsets:
                print(f"{args.cache}: no subsets")
            return 0
        before = fmt.read_attrs(args.cache)
        if args.delete:
            if args.where is not None:
                raise ValueError("--delete takes no --where")
            delete_subset(args.cache, args.name)
            print(f"deleted subset {args.name}")
            return 0
        if args.where is None:
            raise ValueError(f"subset {args.name}: --where EXPR is required")
        fmt.check_name("subset", args.name)
        counts = create_subset(args.cache, args.name, args.where)
    except where.ExpressionError as exc:
        print(f"cache-tools subset: --where: {exc}", file=sys.stderr)
        return 2
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools subset: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only cache: staged first, so the old subset or none
        outcome = write_failure(exc, before, args.cache, f"subset {args.name!r}", lambda a: args.name in a.subsets)
        print(f"cache-tools subset: cannot {'delete' if args.delete else 'write'} subset {args.name!r} in "
              f"{args.cache}: {outcome}", file=sys.stderr)
        return 1
    print(f"{args.name}: {counts['structures']} structures, {counts['origins']} origins")
    return 0
