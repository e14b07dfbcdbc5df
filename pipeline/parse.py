"""Parse an mmCIF file into the heavy atoms that go into images.

Rules (documented in the README, "What goes into an image"):
- the first model only;
- ``assembly``: the asymmetric unit (``asym``, the default), or a biological assembly
  built by gemmi (``make_assembly``, copies of chains named as the originals) from the
  ``_pdbx_struct_assembly*`` records: the ``first`` in the file, or one named by id. A
  file without assembly records is its own single assembly, as macromol_dataframe
  treats it (implicit id "1"): ``first`` and ``1`` then give the asymmetric unit, and
  the result says so (``Atoms.assembly_note``); another id is an :class:`AssemblyError`;
- hydrogens and deuteriums are dropped;
- waters (HOH, DOD, WAT, ...) are dropped;
- ``occupancy``: ``one`` keeps only the first conformer of each atom (gemmi's
  ``remove_alternative_conformations``), voxelized at full weight; ``weight`` keeps
  every conformer with its occupancy clipped to [0, 1] as the weight of its whole
  contribution (what ``macromol_voxelize.image_from_atoms`` does with an ``occupancy``
  column);
- atoms with zero occupancy are dropped (not observed; at ``weight`` they would add 0);
- ligands, ions and nucleic acids are kept: they are part of the environment;
- each atom goes to the first channel that lists its element; ``*`` takes the rest,
  and without ``*`` atoms of unlisted elements are dropped.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_tools.format import ASSEMBLY_ASYM, ASSEMBLY_FIRST, OCCUPANCIES

MMCIF_SUFFIXES = (".cif", ".cif.gz", ".mmcif", ".mmcif.gz")


class ParseError(Exception):
    """A source file cannot be turned into atoms; str() is the one-line reason."""


class AssemblyError(ParseError):
    """The assembly asked for by id does not exist in the file (the user's input is wrong, not the file)."""


@dataclass(frozen=True)
class Atoms:
    """Heavy atoms of one structure as plain numpy arrays (what voxelizing needs)."""

    xyz: np.ndarray       # (n, 3) float64, Å
    channel: np.ndarray   # (n,) int64, index into the channel list
    n_models: int
    block_name: str
    n_chains: int = 0     # chains of the first model, before any atom is dropped
    entry_id: str = ""    # mmCIF _entry.id, upper-cased; "" when the file has none
    block: object = field(default=None, repr=False, compare=False)  # the gemmi cif.Block, for metadata
    occupancy: np.ndarray | None = None  # (n,) float64 weights in (0, 1]; None: all 1 (occupancy "one")
    assembly: str = ASSEMBLY_ASYM        # the assembly the atoms are: an assembly id, or ASSEMBLY_ASYM
    assembly_note: str = ""              # why it is the asymmetric unit although an assembly was asked for

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
    import gemmi

    for e in flat:
        if e in ("H", "D"):
            raise ValueError(f"--channels {spec!r}: {e} matches nothing (hydrogens are never voxelized)")
        if e not in ("*", "X") and gemmi.Element(e).atomic_number == 0:
            raise ValueError(f"--channels {spec!r}: {e!r} is not an element symbol "
                             "(use symbols like C, N, O, SE, or * for the rest)")
    return channels


def structure_key(path: str | os.PathLike) -> str:
    """The structure id derived from a file name: ``/x/1ABC.cif.gz`` -> ``1abc``."""
    name = Path(path).name
    for suffix in sorted(MMCIF_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)].lower()
    return Path(name).stem.lower()


def check_source(path: str | os.PathLike) -> None:
    """Raise ParseError unless ``path`` is a regular file whose name the cache can store.

    Checked before anything opens the file: opening a FIFO blocks forever, and a device
    like /dev/zero never ends.
    """
    path = Path(path)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("file name is not valid UTF-8 (the cache stores names as UTF-8); rename the file") from None
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if path.is_symlink() and isinstance(exc, FileNotFoundError):
            raise ParseError(f"broken symbolic link (target {os.readlink(path)} does not exist)") from None
        raise ParseError(f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ParseError("is a directory")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        raise ParseError(f"{kind}, not a regular file")


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


def parse_atoms(path: str | os.PathLike, channels: list[list[str]], assembly: str = ASSEMBLY_ASYM,
                occupancy: str = "one") -> Atoms:
    """Parse ``path`` (mmCIF, optionally gzipped) into heavy atoms with channel indices.

    ``assembly``: ``asym``, ``first`` or an assembly id; ``occupancy``: ``one`` or ``weight``
    (module docstring)."""
    import gemmi

    if occupancy not in OCCUPANCIES:
        raise ValueError(f"occupancy {occupancy!r}: expected one of {', '.join(OCCUPANCIES)}")

    path = Path(path)
    text = _read_text(path)
    try:
        doc = gemmi.cif.read_string(text)
    except (RuntimeError, ValueError) as exc:
        detail = _gemmi_message(exc)
        if "expected block header" in detail:
            raise ParseError(_not_cif_reason(text) or f"not a CIF file ({detail})") from None
        raise ParseError(f"malformed CIF, truncated or corrupt ({detail})") from None
    if len(doc) == 0:
        raise ParseError("no data block (not a CIF file)")
    block = next((b for b in doc if b.find_mmcif_category("_atom_site.")), None)
    if block is None:
        raise ParseError(_no_atom_site_reason(doc[0]))
    try:
        st = gemmi.make_structure_from_block(block)
    except (RuntimeError, ValueError) as exc:
        raise ParseError(f"malformed _atom_site table ({_gemmi_message(exc)})") from None
    n_models = len(st)
    if n_models == 0:
        rows = len(block.find_mmcif_category("_atom_site."))
        if rows == 0:
            raise ParseError("empty _atom_site table (0 atom rows, so no models)")
        missing = [f"_atom_site.{tag}" for tag in _ATOM_SITE_REQUIRED if block.find_value(f"_atom_site.{tag}") is None
                   and not block.find_loop(f"_atom_site.{tag}")]
        raise ParseError(f"_atom_site table has {rows} rows but no models"
                         + (f" (missing column {', '.join(missing)})" if missing else ""))
    n_chains = len({chain.name for chain in st[0]})  # chain parts (polymer, waters) share a name
    model, used, note = select_assembly(st, assembly)  # before anything is removed: it names whole subchains
    if model is not st[0]:
        st = gemmi.Structure()
        st.add_model(model)
    st.remove_hydrogens()
    weighted = occupancy == "weight"
    if not weighted:
        st.remove_alternative_conformations()
    st.remove_waters()
    model = st[0]

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
    occs: list[float] = []
    unlisted: set[str] = set()  # observed heavy elements no channel takes
    for chain in model:
        for residue in chain:
            for atom in residue:
                if atom.occ <= 0 or weighted and not atom.occ > 0:  # (NaN: no weight to give it)
                    continue
                ch = lookup.get(atom.element.name.upper(), star)
                if ch is None:
                    unlisted.add(atom.element.name.upper())
                    continue
                p = atom.pos
                if not (math.isfinite(p.x) and math.isfinite(p.y) and math.isfinite(p.z)):
                    raise ParseError(f"atom {atom.name} of {residue.name} {chain.name}{residue.seqid.num}: "
                                     "missing or non-numeric coordinates in _atom_site.Cartn_x/y/z")
                coords.append((p.x, p.y, p.z))
                chans.append(ch)
                if weighted:
                    occs.append(atom.occ)
    where = "" if used == ASSEMBLY_ASYM else f" of assembly {used}"
    if not chans and unlisted:
        raise ParseError(f"no atom matches a channel: the "
                         f"{'first model' if used == ASSEMBLY_ASYM else f'assembly {used}'}'s heavy atoms are "
                         f"{', '.join(sorted(unlisted))}, none of them in --channels "
                         f"{','.join('|'.join(c) for c in channels)}")
    if not chans:
        raise ParseError(f"no heavy atoms in the first model{where} (after dropping H, water, zero occupancy)")
    return Atoms(xyz=np.asarray(coords, dtype=np.float64),
                 channel=np.asarray(chans, dtype=np.int64),
                 n_models=n_models, block_name=block.name, n_chains=n_chains, block=block,
                 entry_id=_entry_id(block), occupancy=occupancy_weights(occs) if weighted else None,
                 assembly=used, assembly_note=note)


def occupancy_weights(occ: list[float]) -> np.ndarray:
    """float64 weights from gemmi's float32 occupancies, clipped to (0, 1].

    gemmi keeps an occupancy as float32; ``0.37`` in the file becomes 0.3700000047...
    Its shortest decimal repr (what numpy prints) gives back the file's number for any
    occupancy written with at most 6 significant digits (mmCIF files use 2), so the
    weight equals the file's value parsed as float64, as macromol_dataframe reads it.
    """
    as_text = np.asarray(occ, dtype=np.float32).astype(str)
    return np.minimum(as_text.astype(np.float64), 1.0)


def select_assembly(st, assembly: str):
    """(model, assembly used, note): the first model of ``st`` as asked by ``assembly``
    (module docstring). Raises AssemblyError for an id the file does not define."""
    import gemmi

    model = st[0]
    if assembly == ASSEMBLY_ASYM:
        return model, ASSEMBLY_ASYM, ""
    names = [a.name for a in st.assemblies]
    if not names:
        if assembly in (ASSEMBLY_FIRST, "1"):  # macromol_dataframe: the whole model is the implicit assembly '1'
            return model, ASSEMBLY_ASYM, "no assembly records (_pdbx_struct_assembly); used the asymmetric unit"
        raise AssemblyError(f"no assembly {assembly!r}: the file has no assembly records "
                            "(_pdbx_struct_assembly), only the asymmetric unit (assembly 1)")
    if assembly == ASSEMBLY_FIRST:
        chosen = st.assemblies[0]
    else:
        chosen = next((a for a in st.assemblies if a.name == assembly), None)
        if chosen is None:
            raise AssemblyError(f"no assembly {assembly!r} (its assemblies: {', '.join(names)})")
    try:
        built = gemmi.make_assembly(chosen, model, gemmi.HowToNameCopiedChain.Dup)
    except (RuntimeError, ValueError) as exc:
        raise ParseError(f"cannot build assembly {chosen.name} ({_first_line(exc)})") from None
    return built, chosen.name, ""


def _entry_id(block) -> str:
    import gemmi

    value = block.find_value("_entry.id")
    return "" if value is None or value in ("?", ".") else gemmi.cif.as_string(value).strip().upper()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# Columns without which gemmi reads an _atom_site table as zero models (gemmi 0.7 mmread).
_ATOM_SITE_REQUIRED = ("id", "type_symbol", "label_alt_id", "label_asym_id", "Cartn_x", "Cartn_y", "Cartn_z")
_PDB_RECORDS = ("HEADER", "TITLE ", "COMPND", "SOURCE", "REMARK", "CRYST1", "ATOM  ", "HETATM", "MODEL ",
                "EXPDTA", "AUTHOR", "SEQRES", "KEYWDS", "ORIGX1", "SCALE1")


def _gemmi_message(exc: BaseException) -> str:
    """gemmi's 'string:12:0(345): msg' (we parse from memory) as 'line 12: msg'."""
    text = re.sub(r"^string:(\d+)(?::\d+\(\d+\))?(?: in data_\S+)?:?\s*", r"line \1: ", _first_line(exc))
    return re.sub(r"^string:\s*", "", text)


def _not_cif_reason(text: str) -> str | None:
    """A specific reason for common non-CIF files given a CIF name (PDB format, a web page)."""
    head = text.lstrip()[:4096]
    if any(line.startswith(_PDB_RECORDS) for line in head.splitlines()[:5]):
        return "PDB-format file, not mmCIF (convert it, e.g. `gemmi convert in.pdb out.cif`)"
    if head[:1] == "<" and re.search(r"<(!doctype html|html|head|body)\b", head, re.IGNORECASE):
        return "an HTML page, not a CIF file (a failed download?)"
    if head[:1] == "<":
        return "an XML/HTML document, not a CIF file"
    return None


def _no_atom_site_reason(block) -> str:
    """Why a CIF data block has no mmCIF coordinates: what kind of CIF it is."""
    if block.find_value("_cell_length_a") is not None or block.find_loop("_atom_site_fract_x"):
        kind = "small-molecule CIF"  # CIF 1 core dictionary: fractional coordinates, no _atom_site.Cartn_x
    elif block.find_mmcif_category("_chem_comp_atom.") and block.find_value("_entry.id") is None:
        kind = "chemical-component CIF"  # a CCD/monomer-library entry: one ligand's ideal geometry
    elif block.find_mmcif_category("_refln."):
        kind = "structure-factor mmCIF (reflections)"
    elif block.find_value("_entry.id") is not None:
        kind = "mmCIF entry"  # e.g. a header-only file
    else:
        kind = "CIF"
    return f"{kind} without an _atom_site table (not an mmCIF coordinate file)"
