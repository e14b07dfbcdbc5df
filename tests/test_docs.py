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
              *lightning_options()}  # workflows/train_lightning.py's (tested in test_lightning.py)
    assert sorted(shown - known - others) == []
    assert all(" ".join(c) in readme for c in COMMANDS)


def lightning_options() -> set[str]:
    return set(re.findall(r'add_argument\("(--[a-z][a-z0-9-]+)"', (REPO / "workflows" / "train_lightning.py").read_text()))


def test_readme_intro_names_every_command_and_how_long_the_lightning_fit_runs():
    """Issue 24, item 19: the intro's list of `cache-tools` commands is the dispatcher's, and where
    the README shows train_lightning.py it says how to set the fit's length."""
    from cache_tools.commands.cli import COMMANDS as TOOLS

    readme = (REPO / "README.md").read_text()
    intro = readme[:readme.index("## The idea")]
    listed = re.search(r"`cache-tools ([a-z| -]+)`", intro).group(1)
    assert sorted(name.strip() for name in listed.split("|")) == sorted(TOOLS)
    assert {"--epochs", "--limit-batches"} <= lightning_options()
    shown = readme.index("python workflows/train_lightning.py --cache sample.zarr")
    nearby = readme[shown:readme.index("```python", shown)]
    assert "--epochs N" in nearby and "--limit-batches F" in nearby
