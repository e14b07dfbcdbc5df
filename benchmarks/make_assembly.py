"""Write a ribosome-size mmCIF: copies of a sample structure tiled in space, one real file.

No structure that large ships with the tests, so the memory benchmark and its test make
one: ``copies`` translated copies of e.g. 3v4i (17.7k heavy atoms, ~140 Å across),
each copy's chains renamed, written by gemmi as an ordinary mmCIF that the build parses
like any other entry.

    python benchmarks/make_assembly.py OUT.cif [--source tests/data/mmcif/3v4i.cif.gz] [--copies 3 2 2]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "mmcif"


def make_assembly(out: str | Path, source: str | Path = SAMPLES / "3v4i.cif.gz",
                  copies: tuple[int, int, int] = (3, 2, 2), gap_A: float = 2.0) -> dict:
    """Write ``out`` and return {"atoms": all atom sites, "extent_A": [x, y, z]}."""
    import gemmi
    import numpy as np

    st = gemmi.read_structure(str(source))
    st.setup_entities()
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    model = st[0]
    for name in [m.num for m in st][1:]:
        st.remove_model(name)
    xyz = np.array([a.pos.tolist() for ch in model for r in ch for a in r])
    size = np.ptp(xyz, axis=0) + gap_A
    originals = [ch.clone() for ch in model]
    for ch in [c.name for c in model]:
        model.remove_chain(ch)
    for k, (i, j, l) in enumerate(itertools.product(*(range(c) for c in copies))):
        shift = gemmi.Position(*(np.array([i, j, l]) * size))
        for chain in originals:
            copy = chain.clone()
            copy.name = f"{chain.name}{k}"
            for residue in copy:
                for atom in residue:
                    atom.pos = atom.pos + shift
            model.add_chain(copy)
    st.setup_entities()
    doc = st.make_mmcif_document()
    doc.write_file(str(out))
    n = sum(len(r) for ch in model for r in ch)
    extent = (np.array(copies) - 1) * size + np.ptp(xyz, axis=0)
    return {"atoms": n, "extent_A": [round(float(e), 1) for e in extent]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--source", default=str(SAMPLES / "3v4i.cif.gz"))
    p.add_argument("--copies", type=int, nargs=3, default=(3, 2, 2))
    args = p.parse_args(argv)
    print(make_assembly(args.out, args.source, tuple(args.copies)))


if __name__ == "__main__":
    main(sys.argv[1:])
