"""Are a cache's images the images macromol_gym's own stack makes? Compared bit for bit.

    python benchmarks/against_macromol_gym.py CACHE --their-python /path/to/their/venv/bin/python [--per-structure 5]

For up to ``--per-structure`` origins of every structure of CACHE (built with
``--occupancy weight``, and ``--assembly`` or an origins file's assembly column), the
other interpreter (a venv with macromol_dataframe and macromol_voxelize; see
tests/data/mmgym/make_fixture_db.py for the install line) builds the atoms as
macromol_gym's pick step does (``read_mmcif`` -> ``select_model`` (first model) ->
``prune_water`` -> ``prune_hydrogen`` -> ``make_biological_assembly``; a file without assembly
records is its implicit assembly '1') and voxelizes them with its ``image_from_atoms``
(channels C, N, O, * by ``set_atom_channels_by_element``, radius from the cache) on the
cache's grid at each origin's stored centre. This process reads the cache's images with
``VoxelCacheDataset`` and counts the bit-identical ones. voxel-cache never imports those
packages: the other interpreter runs them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THEIRS = r'''
import sys, numpy as np
import macromol_dataframe as mmdf, macromol_voxelize as mmvox
job = np.load(sys.argv[1], allow_pickle=False)
channels = [list(c.split("|")) for c in job["channels"]]
atoms_of, out = {}, {}
for i, (path, asm) in enumerate(zip(job["paths"].tolist(), job["assemblies"].tolist())):
    if (path, asm) not in atoms_of:
        st = mmdf.read_mmcif(path)
        first_model = st.asym_atoms["model_id"].unique(maintain_order=True).to_list()[0]
        asym = mmdf.prune_hydrogen(mmdf.prune_water(mmdf.select_model(st.asym_atoms, first_model)))
        atoms = mmdf.make_biological_assembly(asym, st.assembly_gen, st.oper_map, "1" if asm == "asym" else asm)
        atoms = mmvox.set_atom_channels_by_element(atoms, channels)
        atoms_of[(path, asm)] = mmvox.set_atom_radius_A(atoms, float(job["radius"]))
    grid = mmvox.Grid(int(job["grid"]), float(job["resolution"]), job["centers"][i].astype(np.float64))
    out[f"img{i}"], _ = mmvox.image_from_atoms(atoms_of[(path, asm)],
                                               mmvox.ImageParams(channels=len(channels), grid=grid))
np.savez(sys.argv[2], **out)
'''


def main(argv: list[str] | None = None) -> int:
    from cache_tools import VoxelCacheDataset
    from cache_tools import format as fmt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("--their-python", required=True, help="an interpreter with macromol_dataframe installed")
    p.add_argument("--per-structure", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    params = fmt.read_attrs(args.cache).params
    if params.occupancy != "weight" or params.rotations != 1 or params.storage.dtype != "float32":
        print("against_macromol_gym: needs a float32 cache built with --occupancy weight and one rotation",
              file=sys.stderr)
        return 2
    ds = VoxelCacheDataset(args.cache)
    ranges = fmt.read_array(args.cache, fmt.STRUCTURE_ORIGIN_RANGE)
    paths = fmt.read_ragged_strings(args.cache, fmt.STRUCTURE_SOURCE_PATH)
    assemblies = fmt.assemblies(args.cache)
    rng = np.random.default_rng(args.seed)
    picks = [(int(o), k) for k, (a, b) in enumerate(ranges)
             for o in np.sort(rng.choice(np.arange(a, b), min(args.per_structure, b - a), replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp, "job.npz"), Path(tmp, "theirs.npz")
        np.savez(job, paths=np.array([fmt.ragged_item(*paths, k) for _, k in picks]),
                 assemblies=np.array([assemblies[k] for _, k in picks]),
                 centers=np.array([ds[o]["center_A"].numpy() for o, _ in picks]),
                 channels=np.array(params.channel_names), grid=params.image.grid_voxels,
                 resolution=params.image.resolution_A, radius=params.image.atom_radius_A)
        subprocess.run([args.their_python, "-c", THEIRS, str(job), str(result)], check=True)
        theirs = np.load(result)
        same, worst = 0, 0.0
        for i, (o, _) in enumerate(picks):
            ours, ref = ds[o]["image"].numpy(), theirs[f"img{i}"]
            same += bool(np.array_equal(ours, ref))
            worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"{args.cache}: {same} of {len(picks)} origins ({len(ranges)} structures) bit-identical to "
          f"macromol_gym's atoms through image_from_atoms; largest |difference| {worst:.3g}")
    return 0 if same == len(picks) else 1


if __name__ == "__main__":
    sys.exit(main())
