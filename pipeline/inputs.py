"""What to build from: command-line inputs -> input files, and a unique id for each."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import InputError
from pipeline.parse import MMCIF_SUFFIXES, structure_key


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (recursive) and @list.txt files -> sorted unique absolute paths."""
    found: set[Path] = set()
    for item in inputs:
        if item.startswith("@"):
            list_file = Path(item[1:])
            try:
                # Paths as the filesystem spells them (surrogateescape), a Windows editor's BOM ignored.
                text = list_file.read_text(encoding="utf-8-sig", errors="surrogateescape")
            except OSError as exc:
                raise InputError(f"{list_file}: cannot read input list ({exc.strerror or exc})") from None
            if "\x00" in text:
                raise InputError(f"{list_file}: input list is not a text file (expected one path per line)")
            lines = text.splitlines()
            base = list_file.parent
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            found.update(expand_inputs([str(base / e) if not os.path.isabs(e) else e for e in entries]))
            continue
        path = Path(item)
        if path.is_dir():
            try:
                os.listdir(path)
            except PermissionError:
                raise InputError(f"{path}: directory is not readable (permission denied)") from None
            for dirpath, _dirs, files in os.walk(path, onerror=_raise_walk_error):
                for name in files:
                    if name.lower().endswith(MMCIF_SUFFIXES):
                        found.add(Path(dirpath, name).absolute())
        elif path.exists():
            found.add(path.absolute())
        else:
            raise InputError(f"{path}: no such file or directory")
    return sorted(found)


def _raise_walk_error(exc: OSError) -> None:
    raise InputError(f"{exc.filename}: cannot list directory ({exc.strerror})")


def structure_ids(sources: list[Path]) -> list[str]:
    """Unique ids from file names; a repeated name gets ``-2``, ``-3``... in input order.

    A suffixed id never takes an id that a file's own name gives (``1abc-2.cif``).
    """
    keys = [structure_key(path) for path in sources]
    taken = set(keys)
    seen: set[str] = set()
    ids = []
    for key in keys:
        if key not in seen:
            seen.add(key)
            ids.append(key)
            continue
        n = 2
        while f"{key}-{n}" in taken:
            n += 1
        taken.add(f"{key}-{n}")
        ids.append(f"{key}-{n}")
    return ids
