"""Issue 12, items 9-12: --origins mistakes, stubs of failed builds, Ctrl-C, info mid-build."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import DATA, sigint_while_waiting_on

BUILD = [sys.executable, "-m", "pipeline.cli", "build-cache"]
TOOLS = [sys.executable, "-m", "cache_tools.commands.cli"]
SMALL = ["--grid-voxels", "11", "--max-origins-per-structure", "3", "--workers", "1", "--quiet"]


def run(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*BUILD, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def first_atom(name: str) -> str:
    from pipeline.parse import parse_atoms, parse_channels
    x, y, z = parse_atoms(DATA / name, parse_channels("C,N,O,*")).xyz[0]
    return f"{x},{y},{z}"


def test_origins_file_mistakes_and_a_failed_build_does_not_block_the_fix(tmp_path):
    out = tmp_path / "c.zarr"
    a, c = DATA / "1aa5.cif.gz", DATA / "1c58.cif.gz"
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"structure_id,x,y,z\n1aa5,{first_atom('1aa5.cif.gz')}\n9zzz,1,2,3\n")
    proc = run(a, "--out", out, "--origins", unknown, *SMALL)
    assert proc.returncode == 2 and "1 structure ids match no input file: 9zzz" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()

    # A failed build (its only input is not mmCIF) leaves a stub; the corrected rerun (other
    # inputs, other origins) replaces it without --overwrite.
    pdb = tmp_path / "1aa5.pdb"
    import gemmi
    pdb.write_text(gemmi.read_structure(str(a)).make_pdb_string())
    proc = run(pdb, "--out", out, *SMALL)
    assert proc.returncode == 1 and "no usable input: all 1 inputs failed" in proc.stderr, proc.stderr
    assert (out / "zarr.json").exists()
    fixed = tmp_path / "fixed.csv"  # 1aa5's origins: one on an atom, one far from every atom
    fixed.write_text(f"1c58,{first_atom('1c58.cif.gz')}\n1aa5,{first_atom('1aa5.cif.gz')}\n1aa5,1000,1000,1000\n")
    proc = run(a, c, "--out", out, "--origins", fixed, *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "1aa5.cif.gz: 1 of 2 --origins rows are empty images, e.g. (1000, 1000, 1000)" in proc.stderr
    assert proc.stderr.startswith("EMPTY ") and "2 ok, 0 failed" in proc.stdout and "origins:    3" in proc.stdout
    info = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "info", str(out)], capture_output=True, text=True)
    assert "empty:" in info.stdout and "1 of 2 --origins rows are empty images" in info.stdout

    # A finished cache is kept; the refusal says what differs in the user's terms.
    proc = run(a, c, DATA / "171l.cif.gz", "--out", out, "--origins", fixed, *SMALL)
    assert proc.returncode == 2 and "the input file list differs: 2 inputs before, 3 now" in proc.stderr
    assert "inputs_sha256" not in proc.stderr and "--overwrite" in proc.stderr


def test_sigint_to_the_process_group_is_one_line_and_info_shows_failures_so_far(tmp_path):
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a 1\n")
    out = tmp_path / "c.zarr"
    # A background job: its own process group, no terminal; SIGINT goes to every process in it.
    proc = subprocess.Popen([*BUILD, bad, DATA / "3v4i.cif.gz", DATA / "1gzx.cif.gz", "--out", out,
                             "--max-origins-per-structure", "0", "--workers", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "voxels" / "zarr.json").exists():  # scan finished, shards being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - sent < 30
    assert stderr.strip() == "pipeline build-cache: interrupted; rerun the same command to resume", stderr

    info = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "info", str(out)],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "INCOMPLETE" in info.stdout and "2 ok, 1 failed (of 3 inputs)" in info.stdout, info.stdout
    assert f"failed:     {bad}: small-molecule CIF" in info.stdout


def test_empty_origins_are_judged_at_the_snapped_centre(tmp_path):
    """--origins rows on a ray leaving 1aa5's outermost atom (5 to 7 Å, 0.1 Å apart) cross the
    image's edge; snapping moves each by up to 0.5 Å. The rows reported empty must be exactly
    the stored images that are all zeros."""
    import numpy as np

    from cache_tools import format as fmt
    from cache_tools.read.dataset import VoxelCacheDataset
    from pipeline.build import build_cache
    from pipeline.parse import parse_atoms, parse_channels

    from conftest import small_params

    xyz = parse_atoms(DATA / "1aa5.cif.gz", parse_channels("C,N,O,*")).xyz
    edge = xyz[np.argmax(xyz[:, 0])]
    rows = [(edge[0] + d, edge[1], edge[2]) for d in np.arange(5.0, 7.0, 0.1)]
    listed = tmp_path / "origins.csv"
    listed.write_text("".join(f"1aa5,{x},{y},{z}\n" for x, y, z in rows))
    out = tmp_path / "c.zarr"
    build_cache([str(DATA / "1aa5.cif.gz")], out, small_params(origins_file=str(listed)), workers=1,
                progress=False, log=lambda *a: None)
    ds = VoxelCacheDataset(out)
    zero = sum(int(ds[i]["image"].max() == 0) for i in range(len(ds)))
    (note,) = [e.reason for e in fmt.read_attrs(out).empty]
    assert 0 < zero < len(rows) and note.startswith(f"{zero} of {len(rows)} --origins rows are empty images")


def test_sigint_reaches_a_build_started_with_sigint_ignored(tmp_path):
    """Issue 24, item 18: `pipeline build-cache ... &` from a script starts with SIGINT ignored;
    SIGINT still interrupts it: one line, exit 130. The build waits on its input list, a FIFO,
    so the signal arrives while it runs, whatever the machine's speed."""
    fifo = tmp_path / "inputs.txt"
    assert sigint_while_waiting_on(fifo, [*BUILD, f"@{fifo}", "--out", tmp_path / "c.zarr", *SMALL]) == \
        (130, "pipeline build-cache: interrupted; rerun the same command to resume\n")
    assert not (tmp_path / "c.zarr").exists()


def test_a_build_with_no_usable_input_says_so_and_the_fixed_input_builds(tmp_path):
    """Issue 24, item 14: the only input is not an mmCIF. The build says what is wrong and what
    to do; `info` and `check` say nothing was built (never "rerun the same command", which would
    fail the same way); once the file is fixed in place, the same command builds it."""
    import gzip
    import shutil

    bad = tmp_path / "1aa5.cif"
    bad.write_text("data_x\n_cell_length_a 1\n")  # a small-molecule CIF: no _atom_site table
    out = tmp_path / "c.zarr"
    proc = run(bad, "--out", out, *SMALL)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    failed, last = proc.stderr.strip().splitlines()
    assert failed.startswith(f"FAILED {bad}: small-molecule CIF")
    assert last == ("pipeline build-cache: no usable input: all 1 inputs failed (see FAILED lines); "
                    "fix or replace them, then build again")
    nothing = ("nothing was built: no usable input (all 1 inputs failed; `cache-tools info` lists why); "
               "fix or replace the inputs, then build again")
    info = subprocess.run([*TOOLS, "info", out], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"{out}: NOTHING BUILT ({nothing})\n"), info.stdout
    assert f"failed:     {bad}: small-molecule CIF" in info.stdout and "rerun" not in info.stdout
    check = subprocess.run([*TOOLS, "check", out], capture_output=True, text=True)
    assert check.returncode == 1 and check.stdout.startswith(f"incomplete: {nothing}\n"), check.stdout
    assert "rerun" not in check.stdout + check.stderr
    subset = subprocess.run([*TOOLS, "subset", out, "s", "--where", "atoms > 0"], capture_output=True, text=True)
    assert subset.returncode == 2 and subset.stderr == f"cache-tools subset: {out}: {nothing}\n", subset.stderr

    with gzip.open(DATA / "1aa5.cif.gz") as src, open(bad, "wb") as dst:  # fixed in place
        shutil.copyfileobj(src, dst)
    proc = run(bad, "--out", out, *SMALL)
    assert proc.returncode == 0 and "1 ok, 0 failed" in proc.stdout, proc.stderr
    info = subprocess.run([*TOOLS, "info", out], capture_output=True, text=True)
    assert info.stdout.startswith(f"{out}: complete\n") and "failed:" not in info.stdout, info.stdout
