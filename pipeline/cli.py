"""`pipeline`: build voxel caches from mmCIF files, and check or repair them with the build's code.

Exit codes of `pipeline build-cache`:
  0  the cache is complete (inputs that failed, if any, are listed and recorded in it);
  1  the build could not finish (no usable input: fix the inputs; a task error, a full disk: rerun);
  2  usage error: bad arguments, a missing input path, an --out that conflicts;
  130 interrupted (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading

from cache_tools.format import (COMPRESSIONS, DEFAULT_BLOCK_EDGE, DEFAULT_COMPRESSION, DEFAULT_COMPRESSION_LEVEL,
                                DEFAULT_LAYOUT, LAYOUTS, OCCUPANCIES, STORAGE_DTYPES, UINT8_DEFAULT_MAX,
                                check_assembly)
from cache_tools.commands.options import (OneLineParser, human_bytes, non_negative_float, non_negative_int,
                                          positive_float, positive_int)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="mmCIF files (.cif, .cif.gz, .mmcif, .mmcif.gz), directories searched recursively, "
                        "or @list.txt with one path per line")
    p.add_argument("--out", required=True, metavar="CACHE", help="the zarr v3 store to write (a directory)")
    g = p.add_argument_group("image")
    g.add_argument("--grid-voxels", type=positive_int, default=21, help="voxels per side (default: %(default)s)")
    g.add_argument("--resolution", type=positive_float, default=1.0, help="Å per voxel (default: %(default)s)")
    g.add_argument("--channels", default="C,N,O,*",
                   help="element groups, one channel each; '|' joins elements, '*' takes the rest "
                        "(default: %(default)s)")
    g.add_argument("--atom-radius", type=positive_float, default=0.5, help="atom radius in Å (default: %(default)s)")
    g.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32",
                   help="storage dtype (default: %(default)s); uint8 stores round(v / scale)")
    g.add_argument("--uint8-max", type=positive_float, default=None,
                   help="with --dtype uint8 only: the value stored as 255; larger values saturate "
                        f"(counted in the summary) (default: {UINT8_DEFAULT_MAX})")
    g.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                   help="codec of each origin inside the shard files; zstd (zarr's own zstd codec, with "
                        "its content checksum) stores the sample images 12.7x (uint8) to 15.8x (float32) "
                        "smaller, read back at ~0.1 ms per image; none stores raw bytes that are copied "
                        "straight from the page cache (default: %(default)s)")
    g.add_argument("--compression-level", type=int, default=None,
                   help="zstd level, 1-22, with --compression zstd only; higher levels barely shrink "
                        f"these images (default: {DEFAULT_COMPRESSION_LEVEL})")
    g.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="origins: one stored image per origin (or per --rotations); lattice: each structure "
                        "voxelized once and stored as its non-empty blocks, views of any size cut at "
                        "training time (README, 'The lattice layout') (default: %(default)s)")
    g.add_argument("--block-edge", type=positive_int, default=DEFAULT_BLOCK_EDGE,
                   help="with --layout lattice: voxels per side of a stored block (default: %(default)s)")
    g.add_argument("--assembly", metavar="{asym,first,ID}", default=None,
                   help="which atoms: asym, the asymmetric unit (first model; the default); first, the "
                        "first biological assembly of each file (_pdbx_struct_assembly, built by gemmi); or "
                        "the assembly with this id (e.g. 2). A file without assembly records is used as its "
                        "asymmetric unit for first or 1 (counted, listed as ASYM); an id a file does not "
                        "define stops the build (exit 2). An --origins file's assembly column sets it per "
                        "structure instead")
    g.add_argument("--occupancy", choices=OCCUPANCIES, default=OCCUPANCIES[0],
                   help="one: the first conformer of each atom, at weight 1; weight: every alternate "
                        "conformer, each contributing its occupancy times its image, as "
                        "macromol_voxelize.image_from_atoms does (default: %(default)s)")
    g.add_argument("--rotations", type=positive_int, default=1,
                   help="images per origin: the canonical one plus K-1 seeded random rotations "
                        "(atoms rotated before voxelizing) (default: %(default)s)")
    g = p.add_argument_group("origins")
    g.add_argument("--min-neighbors", type=non_negative_int, default=30,
                   help="a candidate atom has at least this many heavy atoms within --neighbor-radius "
                        "(default: %(default)s)")
    g.add_argument("--neighbor-radius", type=positive_float, default=6.0, help="Å (default: %(default)s)")
    g.add_argument("--min-spacing", type=non_negative_float, default=6.0,
                   help="no two origins of a structure closer than this, Å (default: %(default)s)")
    g.add_argument("--max-origins-per-structure", type=non_negative_int, default=1000,
                   help="0 for no cap (default: %(default)s)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of origin thinning and rotations (default: %(default)s)")
    g.add_argument("--keep-duplicates", action="store_true",
                   help="keep inputs whose content is byte-identical to an earlier input (by default "
                        "they are skipped and listed: the same images twice would leak across splits)")
    g.add_argument("--origins", metavar="FILE",
                   help="CSV 'structure_id,x,y,z' of origins to use instead of the neighbour rule; with a "
                        "header row, optional columns split (stored as `cache-tools split` stores splits) "
                        "and assembly (asym, first or an id, per structure); "
                        "workflows/from_macromol_gym.py writes one from a macromol_gym database")
    g.add_argument("--exact-centers", action="store_true",
                   help="centre images exactly on the origins and voxelize each one on its own "
                        "(about 10x slower); by default centres are snapped to the image lattice "
                        "(at most --resolution/2 per axis) and images are cut from one voxelization "
                        "of the structure")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="local dask worker processes, one thread each (default: all cores)")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="use an existing dask cluster, e.g. tcp://host:8786 (or set DASK_SCHEDULER_ADDRESS); "
                        "--out must be on a filesystem every worker sees")
    g.add_argument("--origins-per-shard", type=non_negative_int, default=0,
                   help="origins per shard file (default: automatic: ~256 MiB shards, but at least 64 "
                        "shards, so a small cache has small shards written in parallel)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing cache built with other parameters or inputs "
                        "(one built with the same ones is resumed, not rebuilt)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pipeline", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("build-cache", help="voxelize every origin of the inputs into a cache",
                       description="Parse mmCIF files, pick origins, voxelize each once with "
                                   "macromol_voxelize and write a memory-mappable zarr v3 cache. "
                                   "Rerun the same command to resume an interrupted build.",
                       epilog=__doc__.split("\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(p)
    from cache_tools.commands.check import add_arguments as add_check_arguments
    c = sub.add_parser("check", help="cache-tools check, with the options that need the build's code",
                       description="`cache-tools check`, plus what needs the build's code: --sources PATH "
                                   "(sources found by structure id), --spot-check N (origins re-voxelized) "
                                   "and --repair (damaged shards rewritten from their sources). "
                                   "`cache-tools check` runs this command for those options.")
    add_check_arguments(c)
    return parser


def params_from_args(args: argparse.Namespace):
    from pipeline.build import BuildParams
    from pipeline.origins import OriginRule
    from pipeline.parse import parse_channels
    from pipeline.voxelize import ImageSpec, Storage

    channels = parse_channels(args.channels)
    if args.assembly is not None:
        try:
            check_assembly(args.assembly)
        except ValueError as exc:
            raise ValueError(f"--assembly: {exc}") from None
        if args.assembly == "origins":
            raise ValueError("--assembly origins: an --origins file's assembly column chooses the assembly of "
                             "each structure by itself; leave --assembly out")
    if args.uint8_max is not None and args.dtype != "uint8":
        raise ValueError(f"--uint8-max applies only with --dtype uint8 (got --dtype {args.dtype})")
    uint8_max = UINT8_DEFAULT_MAX if args.uint8_max is None else args.uint8_max
    image = ImageSpec(args.grid_voxels, args.resolution, len(channels), args.atom_radius)
    if not args.scheduler and not os.environ.get("DASK_SCHEDULER_ADDRESS"):
        check_image_fits(image, args.workers)
    if args.layout == "lattice":
        from pipeline.encode import lattice_exact

        if args.exact_centers:
            raise ValueError("--exact-centers: the lattice layout cuts every view on the lattice; "
                             "give one or the other")
        if not lattice_exact(image):
            raise ValueError(f"--resolution {args.resolution}: the lattice layout needs a resolution whose "
                             "multiples are exact floats (n / 2**k with a small n, e.g. 1, 0.5, 0.75)")
        if args.block_edge < 2 or args.block_edge > 64:
            raise ValueError(f"--block-edge {args.block_edge}: must be between 2 and 64 voxels")
    elif args.block_edge != DEFAULT_BLOCK_EDGE:
        raise ValueError("--block-edge applies only with --layout lattice")
    level = DEFAULT_COMPRESSION_LEVEL if args.compression_level is None else args.compression_level
    if args.compression == "none" and args.compression_level is not None:
        raise ValueError(f"--compression-level applies only with --compression zstd (got --compression "
                         f"{args.compression})")
    if args.compression != "none" and not 1 <= level <= 22:
        raise ValueError(f"--compression-level must be between 1 and 22, got {level}")
    return BuildParams(
        channels=channels,
        image=image,
        storage=Storage(args.dtype, uint8_max),
        rule=OriginRule(args.min_neighbors, args.neighbor_radius, args.min_spacing,
                        args.max_origins_per_structure, args.seed),
        rotations=args.rotations,
        origins_file=os.path.abspath(args.origins) if args.origins else None,
        origins_per_shard=args.origins_per_shard,
        exact_centers=args.exact_centers,
        keep_duplicates=args.keep_duplicates,
        compression=args.compression, compression_level=level,
        layout=args.layout, block_edge=args.block_edge,
        assembly=args.assembly, occupancy=args.occupancy,
    )


def check_image_fits(image, workers: int | None) -> None:
    """Refuse an image size the local workers cannot hold, before starting them.

    Each worker keeps about three float32 images of the grid at once (the voxelizer's
    buffer, the stored copy and the shard being written); more than the memory budget
    (RAM, or the cgroup limit) would end in worker MemoryErrors instead of one line.
    """
    from cache_tools.read.budget import memory_budget

    per_image = 4 * image.n_channels * image.grid_voxels ** 3
    n = workers or max(1, os.cpu_count() or 1)
    budget = memory_budget()
    if 3 * per_image * n > budget:
        raise ValueError(f"--grid-voxels {image.grid_voxels}: one image is {human_bytes(per_image)} "
                         f"({image.n_channels} channels x {image.grid_voxels}^3 float32), and {n} workers "
                         f"need about {human_bytes(3 * per_image * n)}, more than this machine's memory "
                         f"budget ({human_bytes(budget)}); use a smaller grid or fewer --workers")


def run_build(args: argparse.Namespace) -> int:
    from pipeline.build import build_cache
    from pipeline.errors import BuildError, InputError

    try:
        params = params_from_args(args)
    except ValueError as exc:
        print(f"pipeline build-cache: {exc}", file=sys.stderr)
        return 2
    try:
        summary = build_cache(args.inputs, args.out, params, workers=args.workers,
                              scheduler=args.scheduler, overwrite=args.overwrite, progress=not args.quiet)
    except BuildError as exc:
        for failure in exc.failures:
            print(f"FAILED {failure.path}: {failure.reason}", file=sys.stderr)
        print(f"pipeline build-cache: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    except OSError as exc:  # e.g. disk full while writing: the store stays resumable
        where = f" ({exc.filename})" if exc.filename else ""
        fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix this"
        print(f"pipeline build-cache: {exc.strerror or exc}{where}; {fix} and rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline build-cache: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    for failure in summary.failures:
        print(f"FAILED {failure.path}: {failure.reason}", file=sys.stderr)
    for note in summary.empty:
        print(f"EMPTY {note.path}: {note.reason}", file=sys.stderr)
    for note in summary.asym_fallbacks:
        print(f"ASYM {note.path}: {note.reason}", file=sys.stderr)
    for dup in summary.duplicates:
        print(f"SKIPPED {dup.path}: same content as {dup.same_as} (--keep-duplicates keeps it)",
              file=sys.stderr)
    state = ("already complete, nothing to do" if summary.already_complete
             else "resumed and completed" if summary.resumed else "complete")
    print(f"{summary.out}: {state}\n"
          f"  structures: {summary.structures_ok} ok, {len(summary.failures)} failed"
          + (f", {len(summary.duplicates)} duplicates skipped" if summary.duplicates else "") + "\n"
          f"  origins:    {summary.origins}\n"
          f"  size:       {human_bytes(summary.bytes_on_disk)} ({params.storage.dtype}"
          f"{', ' + params.compression if params.compression != 'none' else ''})\n"
          f"  elapsed:    {summary.elapsed_s:.1f} s" +
          (f"\n  memory:     peak RSS per worker {human_bytes(peak['scan'])} (scan), {human_bytes(peak['voxelize'])} (voxelize)"
           if (peak := summary.peak_worker_rss_bytes) and peak.get("scan") and peak.get("voxelize")
           and not summary.already_complete else "") +
          (f"\n  assembly:   {len(summary.asym_fallbacks)} structures without assembly records hold their "
           "asymmetric unit (listed as ASYM)" if summary.asym_fallbacks else "") +
          (f"\n  saturated:  {summary.saturated_voxels} voxels clipped at --uint8-max {params.storage.uint8_max}"
           if summary.saturated_voxels else ""))
    return 0


def restore_sigint() -> None:
    """Let SIGINT interrupt the command even if it started with SIGINT ignored.

    A job started with ``&`` from a non-interactive shell (a script, ``sh -c``) inherits
    SIGINT ignored, and Python then installs no handler of its own: Ctrl-C sent to the job's
    process group, or ``kill -INT``, would do nothing. With the default handler back it is
    the usual one line and exit 130 (the dask workers still ignore it: worker_setup).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    restore_sigint()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-cache":
            code = run_build(args)
        else:
            from pipeline.repair import run_check
            try:
                code = run_check(args)
            except KeyboardInterrupt:
                print(f"{os.environ.get('VOXEL_CACHE_CALLER', 'pipeline check')}: interrupted", file=sys.stderr)
                return 130
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:  # `pipeline build-cache ... | head -1`: exit quietly, as cache-tools does
        from cache_tools.commands.cli import broken_pipe

        return broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
