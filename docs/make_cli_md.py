"""Regenerate docs/CLI.md from the commands' own --help (tests fail when it drifts).

    python docs/make_cli_md.py > docs/CLI.md
"""
from __future__ import annotations

import os
import subprocess
import sys

COMMANDS = [
    ["pipeline"],
    ["pipeline", "build-cache"],
    ["pipeline", "check"],
    ["cache-tools"],
    ["cache-tools", "info"],
    ["cache-tools", "split"],
    ["cache-tools", "subset"],
    ["cache-tools", "origins"],
    ["cache-tools", "check"],
    ["cache-tools", "show"],
    ["cache-tools", "profile-memory"],
]
MODULES = {"pipeline": "pipeline.cli", "cache-tools": "cache_tools.commands.cli"}


def help_text(command: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", MODULES[command[0]], *command[1:], "--help"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return out.replace("usage: cli.py", f"usage: {command[0]}").rstrip()


def render() -> str:
    parts = ["# Command-line reference", "",
             "Generated from each command's `--help` by `python docs/make_cli_md.py > docs/CLI.md`;",
             "`tests/test_docs.py` fails when this file and the commands disagree.", ""]
    for command in COMMANDS:
        parts += [f"## `{' '.join(command)}`", "", "```", help_text(command), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render())
