"""Docs that must not drift from the code: docs/CLI.md is the commands' own --help."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
from make_cli_md import COMMANDS, render  # noqa: E402


def test_cli_reference_matches_help():
    assert (REPO / "docs" / "CLI.md").read_text() == render() + "\n", (
        "docs/CLI.md is stale: run `python docs/make_cli_md.py > docs/CLI.md`")


def test_readme_names_only_options_that_exist():
    """Every `--option` the README shows for a command is one that command accepts."""
    readme = (REPO / "README.md").read_text()
    helps = render()
    known = set(re.findall(r"--[a-z][a-z0-9-]+", helps))
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", readme))
    others = {"--mem",        # SLURM's
              "--dry-run",    # workflows/build_cache_slurm.py's (tested in test_workflows.py)
              "--cache", "--devices"}  # workflows/train_lightning.py's (tested in test_lightning.py)
    assert sorted(shown - known - others) == []
    assert all(" ".join(c) in readme for c in COMMANDS)
