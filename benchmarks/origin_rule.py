"""The mass rule of `cache-tools origins` against the build's own neighbour-count rule.

Builds the sample (every bundled mmCIF) as a lattice cache at the build's default parameters
(21³ voxels of 1 Å, 4 channels, float32 unless --dtype; origins: >= 30 heavy atoms within 6 Å,
spacing 6 Å, at most 1000 per structure, seed 0), stores the rule-form set with the same
parameters, and compares:

  counts        origins of the build vs of the rule form, in all and per structure
  coverage      fraction of the build's origins within S/2 (3 Å) of a rule-form origin, and
                the reverse; and within S (6 Å): greedy thinning leaves every candidate within
                S of a kept point (below the cap), so that one says whether the two rules
                cover the same regions
  baseline      the same two fractions between the build's origins and the build's rule run
                again with another seed (atoms, seed 1): how close two runs of the *same* rule
                come, since greedy thinning in a random order places origins differently
  count error   at every rule-form origin, its mass count (the ball sum, all channels) against
                the heavy atoms whose centres lie within the radius of the point
  agreement     fraction of rule-form origins where the atom count (minus the point's own
                atom) also reaches min_neighbors, i.e. the atom rule would accept the point

    python benchmarks/origin_rule.py [--dtype float32|uint8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SAMPLES = HERE.parent / "tests" / "data" / "mmcif"


def near_fraction(a: np.ndarray, a_rows: np.ndarray, b: np.ndarray, b_rows: np.ndarray, within: float) -> float:
    """Fraction of points ``a`` with a point of ``b`` of the same structure within ``within`` Å."""
    from scipy.spatial import cKDTree

    near = 0
    for row in np.unique(a_rows):
        mine, theirs = a[a_rows == row], b[b_rows == row]
        if len(theirs):
            near += int((cKDTree(theirs).query(mine)[0] <= within).sum())
    return near / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "uint8"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from scipy.spatial import cKDTree

    from cache_tools import format as fmt
    from cache_tools.commands.origin_rule import MassCounter, MassRule, ball_sums
    from cache_tools.commands.origins import origins_by_rule
    from pipeline.build import build_cache
    from pipeline.cli import build_parser, params_from_args
    from pipeline.encode import snap_centers
    from pipeline.origins import OriginRule, pick_origins
    from pipeline.parse import parse_atoms, parse_channels
    from pipeline.voxelize import ImageSpec

    rule = MassRule()  # the build's defaults: 30, 6 Å, 6 Å, 1000, seed 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "sample.zarr")
        argv = ["build-cache", str(SAMPLES), "--out", str(root), "--layout", "lattice", "--dtype", args.dtype]
        build_cache([str(SAMPLES)], root, params_from_args(build_parser().parse_args(argv)), workers=2,
                    progress=False, log=lambda *a, **k: None)
        t0 = time.perf_counter()
        origins_by_rule(root, "rule", rule, workers=1)
        seconds = time.perf_counter() - t0
        attrs = fmt.read_attrs(root)
        spec = ImageSpec(attrs.params.image.grid_voxels, attrs.params.image.resolution_A, len(attrs.params.channels),
                         attrs.params.image.atom_radius_A)
        built, built_rows = fmt.read_array(root, fmt.CENTER), fmt.read_array(root, fmt.STRUCTURE_INDEX)
        mass, mass_rows = (fmt.read_array(root, fmt.origin_set_array("rule", p))
                           for p in (fmt.ORIGIN_SET_CENTER, fmt.ORIGIN_SET_STRUCTURE_INDEX))
        ids = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
        paths = fmt.read_ragged_strings(root, fmt.STRUCTURE_SOURCE_PATH)
        sha = fmt.read_array(root, fmt.STRUCTURE_SHA256)
        channels = parse_channels(",".join(attrs.params.channel_names))
        counter = MassCounter(str(root), attrs, rule)
        again, again_rows, errors, atoms_ok, per = [], [], [], 0, {}
        for row in range(len(sha)):
            atoms = parse_atoms(fmt.ragged_item(*paths, row), channels)
            other = snap_centers(pick_origins(atoms.xyz, OriginRule(seed=1), sha[row].tobytes().hex()), spec)
            again.append(other)
            again_rows.append(np.full(len(other), row))
            mine = mass[mass_rows == row].astype(np.float64)
            per[fmt.ragged_item(*ids, row)] = {"build": int((built_rows == row).sum()), "rule": len(mine)}
            # the mass count at each rule-form origin, recomputed, against the atoms within the radius
            points = np.rint(mine / spec.resolution_A - counter.shift).astype(np.int64)
            h = counter.margin
            for p, centre in zip(points, mine):
                n = 2 * h + 1
                view = np.empty((1, n, n, n, counter.reader.n_channels), counter.reader.dtype)
                counter.reader.read(np.array([row * attrs.params.rotations]), (p - h)[None], n, view)
                field = view[0].astype(np.float64).sum(axis=-1)
                counted = float(ball_sums(field, np.array([[h, h, h]]), counter.runs)[0]) * counter.scale
                atoms_in = len(cKDTree(atoms.xyz).query_ball_point(centre, rule.neighbor_radius_A))
                errors.append(counted - atoms_in)
                atoms_ok += atoms_in - 1 >= rule.min_neighbors
        again, again_rows = np.concatenate(again), np.concatenate(again_rows)
        half = rule.min_spacing_A / 2
        errors = np.asarray(errors)
        result = {
            "dtype": args.dtype, "rule": rule.to_record(), "seconds_rule_form_1_thread": round(seconds, 2),
            "origins": {"build": int(len(built)), "rule_form": int(len(mass)), "build_seed_1": int(len(again))},
            "coverage": {f"{name}_within_{d:g}A": round(near_fraction(*pair, d), 3) for d in (half, 2 * half)
                         for name, pair in (("build_near_rule_form", (built, built_rows, mass, mass_rows)),
                                            ("rule_form_near_build", (mass, mass_rows, built, built_rows)))},
            "baseline": {f"{name}_within_{d:g}A": round(near_fraction(*pair, d), 3) for d in (half, 2 * half)
                         for name, pair in (("build_near_build_seed_1", (built, built_rows, again, again_rows)),
                                            ("build_seed_1_near_build", (again, again_rows, built, built_rows)))},
            "count_error": {"mean": round(float(errors.mean()), 2), "mean_abs": round(float(np.abs(errors).mean()), 2),
                            "p95_abs": round(float(np.percentile(np.abs(errors), 95)), 2),
                            "max_abs": round(float(np.abs(errors).max()), 2)},
            "atom_rule_accepts_rule_form_origins": round(atoms_ok / len(mass), 3),
            "per_structure": per,
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
