"""Names and constants of the format: array paths, vocabularies, the date encoding, name rules.

Everything a writer and a reader must spell the same way, and nothing that does I/O.
"""
from __future__ import annotations

import datetime as dt
import re

import numpy as np

FORMAT_NAME = "voxel-cache"
FORMAT_VERSION = 1
ATTRS_KEY = "voxel_cache"
BUILD_DIR = ".build"


class CacheError(Exception):
    """A cache cannot be used; the message names the cache and the reason."""


# --- arrays ------------------------------------------------------------------------------

VOXELS = "voxels"
CENTER = "origins/center_A"
STRUCTURE_INDEX = "origins/structure_index"
CRC32 = "origins/crc32"
ROTATION = "origins/rotation"
STRUCTURE_ID = "structures/id"                    # ragged: _utf8 + _offsets
STRUCTURE_SOURCE_PATH = "structures/source_path"  # ragged: _utf8 + _offsets
STRUCTURE_ENTRY_ID = "structures/entry_id"        # ragged: _utf8 + _offsets
STRUCTURE_ASSEMBLY = "structures/assembly"        # ragged: _utf8 + _offsets; only when not all ASSEMBLY_ASYM
STRUCTURE_SHA256 = "structures/source_sha256"
STRUCTURE_ATOM_COUNT = "structures/atom_count"
STRUCTURE_ORIGIN_RANGE = "structures/origin_range"
STRUCTURE_SPLIT = "structures/split"
# Structure metadata read from each mmCIF at build time (pipeline/metadata.py); a cache built
# before these existed lacks them, and readers report them as absent.
STRUCTURE_METHOD = "structures/method"
STRUCTURE_RESOLUTION = "structures/resolution_A"
STRUCTURE_DEPOSITED = "structures/deposited"
STRUCTURE_RELEASED = "structures/released"
STRUCTURE_N_MODELS = "structures/n_models"
STRUCTURE_POLYMER = "structures/polymer"
STRUCTURE_N_CHAINS = "structures/n_chains"
STRUCTURE_META_ARRAYS = (STRUCTURE_METHOD, STRUCTURE_RESOLUTION, STRUCTURE_DEPOSITED, STRUCTURE_RELEASED,
                         STRUCTURE_N_MODELS, STRUCTURE_POLYMER, STRUCTURE_N_CHAINS)
SUBSET_DIR = "structures/subset"  # + "/<NAME>"
# Single-chunk metadata arrays (ragged columns as their two parts); attrs.metadata_crc32
# records the crc32 of each one's chunk file when the build completes.
METADATA_ARRAYS = (CENTER, STRUCTURE_INDEX, CRC32, ROTATION,
                   STRUCTURE_ID + "_utf8", STRUCTURE_ID + "_offsets",
                   STRUCTURE_SOURCE_PATH + "_utf8", STRUCTURE_SOURCE_PATH + "_offsets",
                   STRUCTURE_SHA256, STRUCTURE_ATOM_COUNT, STRUCTURE_ORIGIN_RANGE, STRUCTURE_SPLIT,
                   *STRUCTURE_META_ARRAYS, STRUCTURE_ENTRY_ID + "_utf8", STRUCTURE_ENTRY_ID + "_offsets",
                   # the lattice layout's tables (cache_tools.format.lattice)
                   "lattice/grid", "lattice/map_start", "lattice/block_map", "lattice/block_start",
                   "lattice/block_crc32", "lattice/block_fill", "lattice/rotation", "lattice/rotation_center_A",
                   STRUCTURE_ASSEMBLY + "_utf8", STRUCTURE_ASSEMBLY + "_offsets")

# --- vocabularies --------------------------------------------------------------------------

# Bit i of structures/method: the PDBx _exptl.method vocabulary, append-only; OTHER takes the rest.
METHODS = ("X-RAY DIFFRACTION", "ELECTRON MICROSCOPY", "SOLUTION NMR", "SOLID-STATE NMR",
           "NEUTRON DIFFRACTION", "ELECTRON CRYSTALLOGRAPHY", "FIBER DIFFRACTION", "POWDER DIFFRACTION",
           "SOLUTION SCATTERING", "INFRARED SPECTROSCOPY", "EPR", "FLUORESCENCE TRANSFER",
           "THEORETICAL MODEL", "OTHER")
POLYMERS = ("protein", "DNA", "RNA")  # bit i of structures/polymer

STORAGE_DTYPES = ("float32", "float16", "uint8")
UINT8_DEFAULT_MAX = 2.0  # FractionAtom values of non-overlapping atoms stay below this; see docs
COMPRESSIONS = ("none", "zstd")   # --compression choices; "none" = raw bytes, memory-mapped as is
DEFAULT_COMPRESSION = "zstd"
DEFAULT_COMPRESSION_LEVEL = 1     # BENCHMARKS.md "Compression": level 1 is within 3% of level 3's size, decodes as fast

# Which atoms a structure's images hold (`pipeline build-cache --assembly`, `--occupancy`).
ASSEMBLY_ASYM = "asym"        # the asymmetric unit (first model): the default, and what older caches hold
ASSEMBLY_FIRST = "first"      # the first biological assembly of each file (_pdbx_struct_assembly order)
ASSEMBLY_FROM_ORIGINS = "origins"  # per structure, from the `assembly` column of --origins FILE
OCCUPANCIES = ("one", "weight")    # one: first conformer at weight 1; weight: every conformer x occupancy
ASSEMBLY_ID_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")


def check_assembly(value: str) -> str:
    """``value`` if it can name an assembly: asym, first, or an id (``_pdbx_struct_assembly.id``,
    e.g. 1, 2, PAU: letters, digits, '_', '-', '.', at most 32 characters)."""
    if not isinstance(value, str) or not ASSEMBLY_ID_RULE.fullmatch(value):
        raise ValueError(f"assembly {value!r} is not an assembly id: use {ASSEMBLY_ASYM} (the asymmetric unit), "
                         f"{ASSEMBLY_FIRST}, or an id of _pdbx_struct_assembly.id such as 1")
    return value


# --- dates: days since 1970-01-01 in an int32 ---------------------------------------------

DATE_MISSING = np.iinfo(np.int32).min
_EPOCH = dt.date(1970, 1, 1)


def date_to_days(text: str) -> int:
    """'YYYY-MM-DD' -> days since 1970-01-01 (ValueError names the bad date)."""
    try:
        return (dt.date.fromisoformat(text) - _EPOCH).days
    except ValueError:
        raise ValueError(f"{text!r} is not a date (expected YYYY-MM-DD)") from None


def days_to_date(days: int) -> dt.date | None:
    return None if days == DATE_MISSING else _EPOCH + dt.timedelta(days=int(days))


# --- names users give --------------------------------------------------------------------------

NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = ("zarr.json",)  # zarr's metadata file, beside the directory a subset or origin set gets


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a plain word a split, subset or origin set may have (it becomes a
    directory or a label): letters, digits, '_', '-', '.'; not starting with '.', '-' or '__'
    (zarr reserves those); at most 64 characters; not ``zarr.json``. One rule for every kind."""
    if isinstance(name, str) and name.lower() in RESERVED_NAMES:
        raise ValueError(f"{kind} name {name!r}: the name of a zarr metadata file; choose another")
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name) or name.startswith("__"):
        raise ValueError(f"{kind} name {name!r}: use letters, digits, '_', '-' or '.' (not starting with '.', "
                         "'-' or '__', at most 64 characters)")
    return name


def subset_array(name: str) -> str:
    """Array name of subset ``name``; the name must be a plain word (it becomes a directory)."""
    return f"{SUBSET_DIR}/{check_name('subset', name)}"


def entry_id_from_name(structure_id: str) -> str:
    """The entry id a structure id (a file name) implies: '1qjg_clean' -> '1QJG'.

    Used for files without ``_entry.id`` and for caches built before the
    ``structures/entry_id`` column existed.
    """
    return structure_id.split("_", 1)[0].upper()
