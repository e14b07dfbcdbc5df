"""`cache-tools info CACHE`: what a cache holds, read from its metadata alone (numpy only)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.options import human_bytes
from cache_tools.read import structure_meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", metavar="CACHE", help="path of the zarr store")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cache_info(root: str | Path) -> dict:
    """A JSON-ready description of the cache; works on an incomplete build too."""
    root = Path(root)
    attrs = fmt.read_attrs(root)
    params = attrs.params
    info: dict = {
        "path": str(root.absolute()),
        "complete": attrs.complete,
        "format_version": attrs.format_version,
        "pipeline_version": attrs.pipeline_version,
        "grid": {"voxels_per_side": params.image.grid_voxels, "resolution_A": params.image.resolution_A},
        "channels": [list(c) for c in params.channels],
        "atom_radius_A": params.image.atom_radius_A,
        "voxelizer": params.voxelizer.to_json(),
        "storage": params.storage.to_json(),
        "rotations": params.rotations,
        "assembly": params.assembly,
        "occupancy": params.occupancy,
        "origins_rule": params.origins.to_json(),
        "inputs": params.n_inputs,
        "build": attrs.build,
        "failures": ([n.to_json() for n in attrs.failures] if attrs.complete or attrs.no_usable_input
                     else failures_so_far(root)),
        "duplicates": [n.to_json() for n in attrs.duplicates],
        "empty": [n.to_json() for n in attrs.empty],
        "asym_fallbacks": [n.to_json() for n in attrs.asym_fallbacks],
        "bytes_on_disk": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }
    if attrs.no_usable_input:
        info["nothing_built"] = attrs.incomplete_reason()
    elif not info["complete"]:
        info["scanned_inputs"] = len(list((root / fmt.BUILD_DIR / "scan").glob("*.npz")))
    info["layout"] = params.layout
    lattice = params.lattice is not None
    if (root / (fmt.BLOCKS if lattice else fmt.VOXELS) / "zarr.json").exists() and (root / fmt.CENTER).exists():
        layout = fmt.VoxelLayout(root, fmt.BLOCKS if lattice else fmt.VOXELS)
        n_origins = len(fmt.read_array(root, fmt.CENTER))
        stored = fmt.voxels_nbytes(layout)
        image = [len(params.channels), *(params.image.grid_voxels,) * 3]
        info.update(origins=n_origins, shards=layout.n_shards)
        if lattice:
            maps = sum(fmt.read_array(root, name).nbytes for name in (fmt.LATTICE_MAP, fmt.LATTICE_GRID, fmt.LATTICE_MAP_START, fmt.LATTICE_BLOCK_START))
            info.update(image_shape=image, bytes_per_origin=int(np.prod(image)) * layout.dtype.itemsize,
                        lattice={"block_edge": params.lattice.block_edge, "blocks": layout.n_items,
                                 "blocks_per_shard": layout.items_per_shard, "copies": params.rotations,
                                 "block_map_bytes": int(maps),
                                 "blocks_stored_bytes": stored,
                                 "bytes_per_origin": round((stored + maps) / n_origins, 1) if n_origins else None})
        else:
            info.update(image_shape=list(layout.image_shape), bytes_per_origin=layout.origin_nbytes,
                        origins_per_shard=layout.origins_per_shard)
        info["voxels"] = {  # what the shard files hold, compressed or not
            "codec": layout.codec.name if layout.codec else "none",
            "level": layout.codec.level if layout.codec else None,
            "stored_bytes": stored,
            "stored_bytes_per_origin": round(stored / n_origins, 1) if n_origins else None,
            "compression_ratio": round(layout.n_items * layout.item_nbytes / stored, 2) if stored else None}
        counts = fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT)
        info["structures"] = len(counts)
        ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
        per = ranges[:, 1] - ranges[:, 0]
        info["origins_per_structure"] = {"min": int(per.min()), "median": float(np.median(per)),
                                         "max": int(per.max())}
        used = fmt.assemblies(root)  # structures per assembly id their images hold ("asym": the asymmetric unit)
        info["assemblies"] = {a: used.count(a) for a in sorted(set(used), key=lambda a: (a == fmt.ASSEMBLY_ASYM, a))}
        if attrs.splits:  # named by the attributes (files of a split they do not name are ignored)
            try:
                codes = fmt.read_array(root, fmt.STRUCTURE_SPLIT)
                if codes.shape != per.shape:
                    raise fmt.CacheError(f"array '{fmt.STRUCTURE_SPLIT}' has shape {codes.shape}, expected {per.shape}")
                info["splits"] = {name: {"structures": int((codes == i).sum()), "origins": int(per[codes == i].sum())}
                                  for i, name in enumerate(attrs.splits)}
            except fmt.CacheError as exc:  # the images are intact: say so, and go on
                info["splits_damaged"] = (f"{str(exc).removeprefix(f'{root}: ')}; `cache-tools check` names the "
                                          "command that recreates it")
        if (root / fmt.STRUCTURE_ATOM_COUNT / "zarr.json").exists():
            info["structure_meta"] = distributions(root)
        if attrs.subsets:
            info["subsets"] = {name: record.to_json() for name, record in attrs.subsets.items()}
        if attrs.origin_sets:
            info["origin_sets"] = {name: record.to_json() for name, record in attrs.origin_sets.items()}
    return info


def failures_so_far(root: Path) -> list[dict]:
    """Inputs an unfinished build has already recorded as failed (its ``.build/scan`` results).

    A complete cache lists them in its attributes; until then only the build state has
    them, written as each file's scan ends (older builds did not record path and id).
    """
    scan_dir = root / fmt.BUILD_DIR / "scan"
    failures = []
    for path in sorted(scan_dir.glob("*.npz"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        try:
            with np.load(path, allow_pickle=False) as record:
                if "reason" not in record.files:
                    continue
                failures.append({"path": str(record["source"]) if "source" in record.files else f"input #{path.stem}",
                                 "id": str(record["id"]) if "id" in record.files else None,
                                 "reason": str(record["reason"])})
        except (OSError, ValueError):
            continue  # being written: the next look will see it
    return failures


def storage_error(info: dict) -> str:
    """'max abs error 0.000392 up to 0.2; 447 voxels saturated (clipped to 0.2)', rounded."""
    storage, error = info["storage"], info["storage"]["max_abs_error"]
    if not isinstance(error, (int, float)):
        return f"error {error}"
    text = f"max abs error {error:.3g}"
    if storage["dtype"] == "uint8":
        # The value stored as 255; caches that did not record it have it as 255 steps of the scale
        # (what the Dataset dequantizes with).
        top = storage.get("uint8_max")
        top = 255 * storage["scale"] if top is None else top
        text += f" up to {top:g}"
        saturated = (info.get("build") or {}).get("saturated_voxels", 0)
        text += (f"; {saturated:,} voxels saturated (clipped to {top:g}, larger error)"
                 if saturated else "; no voxel saturated")
    return text


def format_info(info: dict) -> str:
    state = ("complete" if info["complete"] else f"NOTHING BUILT ({info['nothing_built']})"
             if "nothing_built" in info else "INCOMPLETE (build not finished)")
    lines = [f"{info['path']}: {state}"]
    grid = info["grid"]
    lines.append(f"  grid:       {grid['voxels_per_side']}^3 voxels at {grid['resolution_A']} Å, "
                 f"atom radius {info['atom_radius_A']} Å")
    lines.append(f"  channels:   {', '.join('|'.join(c) for c in info['channels'])}")
    storage = info["storage"]
    lines.append(f"  storage:    {storage['dtype']} (scale {storage['scale']:.6g}, {storage_error(info)})")
    vox = info["voxelizer"]
    lines.append(f"  voxelizer:  {vox['name']} {vox['version']} ({vox['fill_algorithm']}, {vox['agg_algorithm']})")
    rule = info["origins_rule"]
    lines.append("  origins by: " + ", ".join(f"{k}={v}" for k, v in rule.items()))
    if info["rotations"] > 1:
        lines.append(f"  rotations:  {info['rotations']} images per origin")
    assembly = info.get("assembly", fmt.ASSEMBLY_ASYM)
    lines.append(f"  assembly:   {assembly} (" + {
        fmt.ASSEMBLY_ASYM: "the asymmetric unit of the first model",
        fmt.ASSEMBLY_FIRST: "the first biological assembly of each file",
        fmt.ASSEMBLY_FROM_ORIGINS: "per structure, from the --origins file"}.get(assembly, "by id")
        + ("; structures per assembly: " + ", ".join(f"{a}: {n}" for a, n in info["assemblies"].items())
           if "assemblies" in info and assembly != fmt.ASSEMBLY_ASYM else "") + ")")
    lines.append("  occupancy:  " + ("weight (every alternate conformer, weighted by its occupancy)"
                                     if info.get("occupancy") == "weight" else
                                     "one (the first conformer of each atom, at weight 1)"))
    if "origins" in info:
        ops = info["origins_per_structure"]
        lines.append(f"  structures: {info['structures']} ok, {len(info['failures'])} failed "
                     f"(of {info['inputs']} inputs)")
        lines.append(f"  origins:    {info['origins']} (per structure: min {ops['min']}, "
                     f"median {ops['median']:g}, max {ops['max']})")
        if "lattice" in info:
            lat = info["lattice"]
            lines.append(f"  layout:     lattice: {lat['blocks']:,} blocks of {lat['block_edge']}³ in {info['shards']} "
                         f"shards" + (f", {lat['copies']} copies per structure" if lat["copies"] > 1 else "")
                         + f"; views of any size cut at training time (image {info['image_shape']} at the origins)")
            codec = info["voxels"]
            lines.append(f"  lattice:    {human_bytes(lat['bytes_per_origin'] or 0)} per origin on disk "
                         f"({codec['codec'] + ' level ' + str(codec['level']) if codec['level'] is not None else 'raw'} "
                         f"blocks {human_bytes(lat['blocks_stored_bytes'])}, block maps "
                         f"{human_bytes(lat['block_map_bytes'])})")
        else:
            lines.append(f"  layout:     {info['shards']} shards of {info['origins_per_shard']} origins, "
                         f"{human_bytes(info['bytes_per_origin'])} per origin, image {info['image_shape']}")
        vox = info["voxels"]
        if vox["codec"] != "none" and "lattice" not in info:
            lines.append(f"  compressed: {vox['codec']} level {vox['level']}, "
                         f"{human_bytes(vox['stored_bytes_per_origin'] or 0)} per origin on disk "
                         f"({vox['compression_ratio']}x smaller)")
    elif "scanned_inputs" in info:
        lines.append(f"  structures: scanning, {info['scanned_inputs']} of {info['inputs']} inputs done, "
                     f"{len(info['failures'])} failed so far")
    for name, split in info.get("splits", {}).items():
        lines.append(f"  split {name}: {split['structures']} structures, {split['origins']} origins")
    if info.get("splits_damaged"):
        lines.append(f"  split:      damaged: {info['splits_damaged']}")
    if "structure_meta" in info:
        lines.extend(format_distributions(info["structure_meta"]))
    for name, subset in info.get("subsets", {}).items():
        lines.append(f"  subset {name}: {subset['structures']} structures, {subset['origins']} origins "
                     f"where {subset['where']}")
    if info.get("origin_sets"):
        from cache_tools.commands.origins import describe

        for name, record in info["origin_sets"].items():
            lines.append(f"  origin set {name}: {describe(fmt.OriginSetRecord.from_json(record))}")
    lines.append(f"  on disk:    {human_bytes(info['bytes_on_disk'])}")
    build = info["build"]
    if build.get("finished"):
        lines.append(f"  built:      {build['finished']} by pipeline {info['pipeline_version']}")
    if build.get("saturated_voxels"):
        lines.append(f"  saturated:  {build['saturated_voxels']} voxels clipped to the uint8 maximum")
    for failure in info["failures"][:20]:
        lines.append(f"  failed:     {failure['path']}: {failure['reason']}")
    if len(info["failures"]) > 20:
        lines.append(f"  ... and {len(info['failures']) - 20} more failures (--json lists all)")
    for note in info["asym_fallbacks"][:20]:
        lines.append(f"  asym:       {note['path']}: {note['reason']}")
    if len(info["asym_fallbacks"]) > 20:
        lines.append(f"  ... and {len(info['asym_fallbacks']) - 20} more without assembly records (--json lists all)")
    for note in info["empty"][:20]:
        lines.append(f"  empty:      {note['path']}: {note['reason']}")
    for dup in info["duplicates"][:20]:
        lines.append(f"  skipped:    {dup['path']}: same content as {dup['same_as']}")
    if len(info["duplicates"]) > 20:
        lines.append(f"  ... and {len(info['duplicates']) - 20} more duplicates (--json lists all)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        info = cache_info(args.cache)
    except fmt.CacheError as exc:
        print(f"cache-tools info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


# --- structure metadata ---------------------------------------------------------------

def distributions(root: str | os.PathLike) -> dict[str, Any] | None:
    """What `cache-tools info` shows: counts per method/polymer, ranges of the numbers and dates."""
    cols = structure_meta.StructureColumns(root)
    if not cols.present:
        return None
    out: dict[str, Any] = {}
    for column in ("method", "polymer"):
        bits = cols.values(column).astype(np.int64)
        out[column] = {name: int((bits >> i & 1).sum()) for i, name in enumerate(structure_meta.VOCABULARY[column])
                       if (bits >> i & 1).any()}
        out[column]["(none)"] = int((bits == 0).sum())
    res = cols.values("resolution")
    known = res[~np.isnan(res)]
    edges = [0, 1.5, 2.0, 2.5, 3.0, 4.0, np.inf]
    out["resolution_A"] = {
        "absent": int(np.isnan(res).sum()),
        **({"min": float(known.min()), "median": float(np.median(known)), "max": float(known.max())}
           if len(known) else {}),
        "histogram": {(f"<{hi:g}" if lo == 0 else f">={lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}"):
                      int(((known >= lo) & (known < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])},
    }
    for column in ("deposited", "released"):
        days = cols.values(column)
        known = np.sort(days[days != fmt.DATE_MISSING])
        out[column] = {"absent": int(len(days) - len(known))}
        if len(known):
            out[column].update(first=str(fmt.days_to_date(known[0])), median=str(fmt.days_to_date(known[len(known) // 2])),
                               last=str(fmt.days_to_date(known[-1])))
    for column in ("models", "chains"):
        v = cols.values(column)
        out[column] = {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())} if len(v) else {}
    return out


def format_distributions(d: dict[str, Any] | None) -> list[str]:
    if d is None:
        return ["  metadata:   absent (built before structure metadata was recorded)"]
    def counts(c: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in c.items() if v or k != "(none)")
    res = d["resolution_A"]
    lines = [f"  method:     {counts(d['method'])}",
             f"  polymer:    {counts(d['polymer'])}",
             "  resolution: " + (f"min {res['min']:.2f}, median {res['median']:.2f}, max {res['max']:.2f} Å; "
                                 if "min" in res else "")
             + ", ".join(f"{k} {v}" for k, v in res["histogram"].items()) + f"; absent {res['absent']}"]
    for column in ("deposited", "released"):
        c = d[column]
        lines.append(f"  {column + ':':<11} " + (f"{c['first']} .. {c['last']} (median {c['median']}); "
                                                  if "first" in c else "") + f"absent {c['absent']}")
    for column in ("models", "chains"):
        c = d[column]
        if c:
            lines.append(f"  {column + ':':<11} min {c['min']}, median {c['median']:g}, max {c['max']}")
    return lines
