"""`cache-tools`: read, check, split, show and profile voxel caches.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``cache-tools info`` never pays for matplotlib and friends.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

from cache_tools.commands.options import OneLineParser

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("cache_tools.commands.info", "show parameters, counts, bytes and completeness of a cache"),
    "check": ("cache_tools.commands.check", "verify a cache: completeness, checksums, values, staleness"),
    "split": ("cache_tools.commands.split", "assign structures to train/val/test splits stored in the cache"),
    "subset": ("cache_tools.commands.subset", "store a named subset of structures selected by metadata (--where EXPR)"),
    "origins": ("cache_tools.commands.origins", "store named sets of view centres in a lattice cache: from a CSV, "
                "or by the neighbour-count rule on the stored voxels"),
    "show": ("cache_tools.commands.show", "draw origins (on a lattice cache: views of any size, origin sets, neighbor pairs) as max-intensity projections per channel: a contact sheet to check by eye"),
    "profile-memory": ("cache_tools.commands.profile_memory", "sample private/shared, anon/file memory of a process tree"),
}


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # started with SIGINT ignored (`cache-tools check ... &` from a script): Ctrl-C would do nothing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="cache-tools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(chosen) + 1:]  # the command's own arguments, for commands that hand them on
    module = importlib.import_module(args._module)
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except KeyboardInterrupt:
        print("cache-tools: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return broken_pipe()


def broken_pipe() -> int:
    """The reader of stdout went away (`cache-tools info CACHE | head -3`): exit quietly, as a
    shell's commands do (128 + SIGPIPE), with nothing on stderr. stdout is pointed at /dev/null
    so the interpreter's final flush does not report the same error again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
