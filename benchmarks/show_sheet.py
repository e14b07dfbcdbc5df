"""How long `cache-tools show` takes to draw a contact sheet, and where the time goes.

One run: a sheet of N random origins (default 16) of a cache, best of --repeats passes
of each step in-process (read + flag, build the figure, write the PNG), then the whole
command as a user runs it (a fresh Python: imports included), best of 3.

    python benchmarks/show_sheet.py --cache sample.zarr [--origins 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--origins", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()

    t = time.perf_counter()
    from cache_tools.commands.show import collect, contact_sheet
    import cache_tools.read.dataset  # noqa: F401  (torch)
    import matplotlib.backends.backend_agg  # noqa: F401
    imports = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "sheet.png")
        t_collect, sheet = best(lambda: collect(args.cache, random=args.origins, seed=args.seed), args.repeats)
        t_figure, fig = best(lambda: contact_sheet(sheet), args.repeats)
        t_save, _ = best(lambda: fig.savefig(out), args.repeats)
        png_bytes = out.stat().st_size
        command = [sys.executable, "-m", "cache_tools.commands.cli", "show", args.cache, "--random", str(args.origins),
                   "--seed", str(args.seed), "--out", str(out)]
        t_cli, _ = best(lambda: subprocess.run(command, check=True, capture_output=True), 3)
    result = {"origins": args.origins, "rows": len(sheet.rows), "channels": len(sheet.channels),
              "image_shape": list(sheet.rows[0].projections.shape), "png_bytes": png_bytes,
              "imports_s": imports, "collect_s": t_collect, "figure_s": t_figure, "savefig_s": t_save,
              "in_process_total_s": t_collect + t_figure + t_save, "command_s": t_cli,
              "load_average": os.getloadavg()}
    print(f"{args.origins} origins x {len(sheet.channels)} channels, PNG {png_bytes / 1024:.0f} KiB")
    for key in ("imports_s", "collect_s", "figure_s", "savefig_s", "in_process_total_s", "command_s"):
        print(f"  {key[:-2]:<18} {result[key]:6.2f} s")
    print(f"  load average       {' '.join(f'{x:.2f}' for x in result['load_average'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
