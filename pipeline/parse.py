"""Parse an mmCIF file into the heavy atoms that go into images.

Rules (documented in the README, "What goes into an image"):
- the first model only;
- hydrogens and deuteriums are dropped;
- waters (HOH, DOD, WAT, ...) are dropped;
- alternate locations: only the first conformer of each atom is kept
  (gemmi's ``remove_alternative_conformations``), voxelized at full weight;
- atoms with zero occupancy are dropped (not observed);
- ligands, ions and nucleic acids are kept: they are part of the environment;
- each atom goes to the first channel that lists its element; ``*`` takes the rest,
  and without ``*`` atoms of unlisted elements are dropped.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MMCIF_SUFFIXES = (".cif", ".cif.gz", ".mmcif", ".mmcif.gz")


class ParseError(Exception):
    """A source file cannot be turned into atoms; str() is the one-line reason."""


@dataclass(frozen=True)
class Atoms:
    """Heavy atoms of one structure as plain numpy arrays (what voxelizing needs)."""

    xyz: np.ndarray       # (n, 3) float64, Å
    channel: np.ndarray   # (n,) int64, index into the channel list
    n_models: int
    block_name: str

    def __len__(self) -> int:
        return len(self.channel)


def parse_channels(spec: str) -> list[list[str]]:
    """``"C,N,O,S|SE,*"`` -> ``[["C"], ["N"], ["O"], ["S", "SE"], ["*"]]`` (upper-cased)."""
    channels = []
    for item in spec.split(","):
        elements = [e.strip().upper() for e in item.split("|") if e.strip()]
        if not elements:
            raise ValueError(f"--channels {spec!r}: empty channel")
        channels.append(elements)
    flat = [e for ch in channels for e in ch]
    if len(set(flat)) != len(flat):
        raise ValueError(f"--channels {spec!r}: an element is listed twice")
    return channels


def structure_key(path: str | os.PathLike) -> str:
    """The structure id derived from a file name: ``/x/1ABC.cif.gz`` -> ``1abc``."""
    name = Path(path).name
    for suffix in sorted(MMCIF_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)].lower()
    return Path(name).stem.lower()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_text(path: Path) -> str:
    """Read (and gunzip) a file, turning every low-level failure into a one-line reason."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ParseError("is a directory") from None
    except PermissionError:
        raise ParseError("permission denied") from None
    except OSError as exc:
        raise ParseError(f"cannot read: {exc.strerror or exc}") from None
    if not raw:
        raise ParseError("empty file")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ParseError(f"corrupt or truncated gzip ({exc})") from None
        if not raw.strip():
            raise ParseError("empty file (after gunzip)")
    if b"\x00" in raw[:65536]:
        raise ParseError("binary data, not a CIF text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # CIF is ASCII; tolerate stray bytes in comments


def parse_atoms(path: str | os.PathLike, channels: list[list[str]]) -> Atoms:
    """Parse ``path`` (mmCIF, optionally gzipped) into heavy atoms with channel indices."""
    import gemmi

    path = Path(path)
    text = _read_text(path)
    try:
        doc = gemmi.cif.read_string(text)
    except (RuntimeError, ValueError) as exc:
        raise ParseError(f"not a CIF file ({_first_line(exc)})") from None
    if len(doc) == 0:
        raise ParseError("no data block (not a CIF file)")
    block = next((b for b in doc if b.find_mmcif_category("_atom_site.")), None)
    if block is None:
        kind = "small-molecule CIF" if doc[0].find_value("_cell_length_a") and doc[0].find_loop(
            "_atom_site_label") else "chemical-component CIF" if doc[0].find_mmcif_category(
            "_chem_comp_atom.") else "CIF"
        raise ParseError(f"{kind} without an _atom_site table (not an mmCIF coordinate file)")
    try:
        st = gemmi.make_structure_from_block(block)
    except (RuntimeError, ValueError) as exc:
        raise ParseError(f"malformed _atom_site table ({_first_line(exc)})") from None
    n_models = len(st)
    if n_models == 0:
        raise ParseError("no models in the _atom_site table")
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_waters()

    lookup = {}
    star = None
    for i, elements in enumerate(channels):
        for e in elements:
            if e == "*":
                star = i
            else:
                lookup[e] = i

    coords: list[tuple[float, float, float]] = []
    chans: list[int] = []
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                if atom.occ <= 0:
                    continue
                ch = lookup.get(atom.element.name.upper(), star)
                if ch is None:
                    continue
                p = atom.pos
                coords.append((p.x, p.y, p.z))
                chans.append(ch)
    if not chans:
        raise ParseError("no heavy atoms in the first model (after dropping H, water, zero occupancy)")
    return Atoms(xyz=np.asarray(coords, dtype=np.float64),
                 channel=np.asarray(chans, dtype=np.int64),
                 n_models=n_models, block_name=block.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
