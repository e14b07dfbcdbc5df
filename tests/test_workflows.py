"""The recipes in workflows/ run as documented."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import store_files

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def test_slurm_dry_run_prints_job_script(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, str(WORKFLOWS / "build_cache_slurm.py"), str(data_dir), "--out",
                           str(tmp_path / "pdb.zarr"), "--dry-run", "--jobs", "7", "--cores-per-job", "16",
                           "--memory-per-job", "32GB", "--queue", "short", "--account", "lab42",
                           "--walltime", "02:00:00", "--dtype", "uint8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH -p short", "#SBATCH -A lab42", "#SBATCH --cpus-per-task=16", "#SBATCH -t 02:00:00"):
        assert line in out
    assert "--nthreads 1" in out and "--nworkers 16" in out
    assert "would submit 7 such jobs (112 worker processes)" in out and "uint8" in out
    assert not (tmp_path / "pdb.zarr").exists()


def test_train_example_runs_and_plots(tmp_path, cache_factory):
    cache = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), cache)
    before = store_files(cache)
    out = tmp_path / "profile"
    proc = subprocess.run([sys.executable, str(WORKFLOWS / "train_example.py"), "--cache", str(cache),
                           "--steps", "8", "--val-every", "4", "--batch-size", "8", "--workers", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("val accuracy") == 2
    assert store_files(cache) == before  # split in memory: the user's cache is not written
    assert "split in memory, balanced by origins; the cache is not changed" in proc.stderr
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    marks = (out / "marks.csv").read_text()
    assert "validation" in marks and "epoch 0" in marks


def test_pdb_estimate(cache_factory):
    proc = subprocess.run([sys.executable, str(WORKFLOWS / "pdb_estimate.py"), str(cache_factory()),
                           "--entries", "1000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| float32 |" in proc.stdout and "core-hours" in proc.stdout
    assert "measured at load average" in proc.stdout  # the figure depends on load: say it


def test_train_neighbors_fits_pairs_in_one_command(lattice_factory):
    cache = lattice_factory()
    proc = subprocess.run([sys.executable, str(WORKFLOWS / "train_neighbors.py"), "--cache", str(cache),
                           "--epochs", "2", "--epoch-size", "64", "--batch-size", "16", "--limit-val-batches", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 epochs of 64 pairs" in proc.stdout and "validation accuracy per epoch" in proc.stdout
    assert "validating on pairs of the training data drawn with another seed" in proc.stderr
    origins = subprocess.run([sys.executable, str(WORKFLOWS / "train_neighbors.py"), "--cache",
                              str(lattice_factory(layout="origins"))], capture_output=True, text=True, timeout=120)
    assert origins.returncode == 2 and origins.stderr.strip().endswith("--layout lattice`")


def test_pdb_estimate_of_a_lattice_cache(lattice_factory):
    proc = subprocess.run([sys.executable, str(WORKFLOWS / "pdb_estimate.py"), str(lattice_factory()),
                           "--entries", "230000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "lattice layout (uint8, zstd" in ln)
    assert "bytes/origin measured" in line and "GiB on disk for the PDB" in line
