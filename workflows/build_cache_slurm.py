#!/usr/bin/env python3
"""Build a voxel cache of the whole PDB on a SLURM cluster with dask-jobqueue.

Recipe: this script runs on a login node (or in a small long-lived job); it starts
a dask scheduler there, submits ``--jobs`` SLURM jobs of dask workers (one
single-threaded worker process per core), and runs ``pipeline build-cache`` on
them. ``--out`` must be on a filesystem every compute node sees (Lustre, GPFS,
NFS). If the build is interrupted (walltime, preemption), rerun the same command:
finished structures and shards are skipped.

    pip install dask-jobqueue
    python workflows/build_cache_slurm.py /pdb/mmCIF --out /scratch/$USER/pdb.zarr \\
        --jobs 20 --cores-per-job 32 --memory-per-job 64GB --walltime 04:00:00 \\
        --queue normal --account myproj --dtype uint8
    python workflows/build_cache_slurm.py /pdb/mmCIF --out x.zarr --dry-run   # print the job script

Every `pipeline build-cache` option (grid, channels, origins, dtype, ...) is accepted.
Memory: a write task holds one structure's atoms and one image (< 100 MB), so
~2 GB per core is plenty.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pipeline.cli import add_build_arguments, params_from_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(p)
    g = p.add_argument_group("SLURM")
    g.add_argument("--jobs", type=int, default=10, help="SLURM jobs of dask workers (default: %(default)s)")
    g.add_argument("--cores-per-job", type=int, default=32, help="default: %(default)s")
    g.add_argument("--memory-per-job", default="64GB", help="default: %(default)s")
    g.add_argument("--walltime", default="04:00:00", help="default: %(default)s")
    g.add_argument("--queue", default=None, help="SLURM partition (-p)")
    g.add_argument("--account", default=None, help="SLURM account (-A)")
    g.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="extra #SBATCH directive, e.g. --job-extra=--exclusive (repeatable)")
    g.add_argument("--log-dir", default="dask-logs", help="worker job logs (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the worker job script and the plan, submit nothing")
    return p


def job_kwargs(args: argparse.Namespace) -> dict:
    return dict(queue=args.queue, account=args.account, cores=args.cores_per_job,
                processes=args.cores_per_job,  # one single-threaded worker per core: gemmi/voxelizer hold the GIL
                memory=args.memory_per_job, walltime=args.walltime,
                job_extra_directives=list(args.job_extra), python=sys.executable,
                log_directory=args.log_dir, name="voxel-cache-worker")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = params_from_args(args)
    except ValueError as exc:
        print(f"build_cache_slurm: {exc}", file=sys.stderr)
        return 2
    try:
        from dask_jobqueue import SLURMCluster
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        print("build_cache_slurm: needs dask-jobqueue (pip install dask-jobqueue)", file=sys.stderr)
        return 2
    kwargs = job_kwargs(args)
    if args.dry_run:
        script = SLURMJob(scheduler="tcp://SCHEDULER:8786", **{k: v for k, v in kwargs.items()
                                                               if k != "log_directory"}).job_script()
        print(script)
        print(f"# would submit {args.jobs} such jobs ({args.jobs * args.cores_per_job} worker processes), "
              f"then build {' '.join(args.inputs)} -> {args.out} with {params.storage.dtype} images of "
              f"{params.image.shape}")
        return 0

    from pipeline.cli import run_build

    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(**kwargs)
    cluster.scale(jobs=args.jobs)
    print(f"scheduler {cluster.scheduler_address}; dashboard {cluster.dashboard_link}; "
          f"waiting for workers of {args.jobs} jobs...", file=sys.stderr)
    try:
        from distributed import Client
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=3600)  # the queue may be slow; start with whoever is up
        time.sleep(5)
        args.scheduler = cluster.scheduler_address
        return run_build(args)
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
