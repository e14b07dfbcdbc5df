"""Structure metadata read from each mmCIF at build time: method, resolution, dates, models,
polymer types, chains.

The scan task calls :func:`scan_fields` on the block it already parsed and keeps the
result in its scan record; :func:`write_columns` turns the records into the fixed-width
columns of ``format.STRUCTURE_META_ARRAYS`` (one memory-mapped array each, no Python
object per structure on the read side).

Real files miss fields all the time (header-stripped files, old entries, models): a
missing or unparsable field becomes its "absent" value (NaN, ``DATE_MISSING``, 0 bits)
and never fails the build.
"""
from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path

import numpy as np

from cache_tools import format as fmt

_EPOCH = dt.date(1970, 1, 1)
# _entity_poly.type -> bits of format.POLYMERS (protein, DNA, RNA)
_POLYMER_BITS = {"polypeptide(l)": 1, "polypeptide(d)": 1, "cyclic-pseudo-peptide": 1,
                 "polydeoxyribonucleotide": 2, "polyribonucleotide": 4,
                 "polydeoxyribonucleotide/polyribonucleotide hybrid": 6, "peptide nucleic acid": 2}


def _values(block, tag: str) -> list[str]:
    """Non-null, unquoted values of ``tag`` (one per loop row, or the single pair value)."""
    import gemmi

    column = block.find_values(tag)
    return [gemmi.cif.as_string(v).strip() for v in column if not gemmi.cif.is_null(v)]


def _floats(values: list[str]) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            continue
        if math.isfinite(x) and x > 0:
            out.append(x)
    return out


def parse_date(text: str) -> int:
    """'YYYY-MM-DD' (anything after the date ignored) -> days since 1970-01-01, or DATE_MISSING."""
    try:
        return (dt.date.fromisoformat(text.strip()[:10]) - _EPOCH).days
    except ValueError:
        return int(fmt.DATE_MISSING)


def _first_date(values: list[str]) -> int:
    days = [d for d in map(parse_date, values) if d != fmt.DATE_MISSING]
    return min(days) if days else int(fmt.DATE_MISSING)


def method_bits(methods: list[str]) -> int:
    bits = 0
    for m in methods:
        name = " ".join(m.upper().split())
        bits |= 1 << (fmt.METHODS.index(name) if name in fmt.METHODS else fmt.METHODS.index("OTHER"))
    return bits


def scan_fields(block, n_models: int, n_chains: int) -> dict[str, np.ndarray]:
    """The metadata of one parsed structure, as plain arrays for its scan record (never raises)."""
    fields = {"meta_method": 0, "meta_resolution": math.nan, "meta_deposited": int(fmt.DATE_MISSING),
              "meta_released": int(fmt.DATE_MISSING), "meta_polymer": 0}
    try:
        fields["meta_method"] = method_bits(_values(block, "_exptl.method"))
        res = _floats(_values(block, "_refine.ls_d_res_high")
                      + _values(block, "_em_3d_reconstruction.resolution"))
        fields["meta_resolution"] = min(res) if res else math.nan
        fields["meta_deposited"] = _first_date(
            _values(block, "_pdbx_database_status.recvd_initial_deposition_date")
            or _values(block, "_database_PDB_rev.date_original"))
        fields["meta_released"] = _first_date(
            _values(block, "_pdbx_audit_revision_history.revision_date")
            or _values(block, "_database_PDB_rev.date"))
        polymer = 0
        for kind in _values(block, "_entity_poly.type"):
            polymer |= _POLYMER_BITS.get(kind.lower(), 0)
        fields["meta_polymer"] = polymer
    except Exception:  # noqa: BLE001 - a strange header loses its metadata, never the structure
        pass
    return {"meta_method": np.uint16(fields["meta_method"]),
            "meta_resolution": np.float32(fields["meta_resolution"]),
            "meta_deposited": np.int32(fields["meta_deposited"]),
            "meta_released": np.int32(fields["meta_released"]),
            "meta_n_models": np.int32(n_models), "meta_n_chains": np.int32(n_chains),
            "meta_polymer": np.uint8(fields["meta_polymer"])}


# scan-record key -> (array name, dtype, absent value)
_COLUMNS = {
    "meta_method": (fmt.STRUCTURE_METHOD, np.uint16, 0),
    "meta_resolution": (fmt.STRUCTURE_RESOLUTION, np.float32, np.nan),
    "meta_deposited": (fmt.STRUCTURE_DEPOSITED, np.int32, fmt.DATE_MISSING),
    "meta_released": (fmt.STRUCTURE_RELEASED, np.int32, fmt.DATE_MISSING),
    "meta_n_models": (fmt.STRUCTURE_N_MODELS, np.int32, 0),
    "meta_polymer": (fmt.STRUCTURE_POLYMER, np.uint8, 0),
    "meta_n_chains": (fmt.STRUCTURE_N_CHAINS, np.int32, 0),
}


def write_columns(root: str | os.PathLike, records: list[dict]) -> None:
    """One column per field over the structures' scan records (in structure order).

    A record without a field (a scan resumed from before this module existed) gets
    the absent value.
    """
    for key, (name, dtype, absent) in _COLUMNS.items():
        fmt.write_array(Path(root), name, np.array([r.get(key, absent) for r in records], dtype=dtype))
