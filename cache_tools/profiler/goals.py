"""Verdicts of the loader-memory harness (:mod:`.phases`): each memory goal with the numbers
measured and met or missed, never asserted (benchmarks report, tests assert).

A *run* is what ``benchmarks/loader_memory.py`` assembles for one loader and size: its
``loader``, ``origins``, ``status``, ``epochs_run``, ``peak`` (Σ over the tree, MiB) and
``snapshots`` (per label: the train and val workers' USS, private anon, ... in MiB).
"""
from __future__ import annotations

from typing import Any

BARE = "bare"  # the loader whose workers load nothing: the floor


# Snapshots at which a loader's workers are idle (their pass is over), in order; a worker's
# memory is compared across these only (mid-pass it also holds batches in flight).
def idle_labels(phase: str, epochs: int) -> list[str]:
    """Labels of the snapshots, from the end of the loader's first pass on, where its workers are idle."""
    labels = []
    for e in range(1, epochs + 1):
        if phase == "train":
            labels += [f"epoch {e} end", f"validation {e} start", f"validation {e} end"]
        else:
            labels += [f"validation {e} end"] + ([f"epoch {e + 1} start", f"epoch {e + 1} end"] if e < epochs else [])
    return labels


def idle_series(run: dict, phase: str, key: str) -> list[list[float]]:
    """Per worker of ``phase``, its ``key`` (MiB) at each idle snapshot (see idle_labels)."""
    snaps = {s["label"]: s for s in run["snapshots"]}
    points = [snaps[label][phase][key] for label in idle_labels(phase, run["epochs_run"])
              if label in snaps and phase in snaps[label]]
    return [list(w) for w in zip(*points)] if points else []


def fmt_number(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def mean_or_none(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def end_of_run_worker(run: dict, key: str) -> float | None:
    """Mean ``key`` (MiB) over all workers (train and val) at the last snapshot."""
    if not run["snapshots"]:
        return None
    last = run["snapshots"][-1]
    return mean_or_none(last.get("train", {}).get(key, []) + last.get("val", {}).get(key, []))


def evaluate_goals(runs: list[dict], uss_margin: float = 8.0, flat: float = 2.0, ratio_goal: float = 20.0
                   ) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured numbers and met / missed (not asserted)."""
    goals: list[dict[str, Any]] = []
    bare = next((r for r in runs if r["loader"] == BARE and r["status"] == "completed"), None)
    bare_uss = end_of_run_worker(bare, "uss") if bare else None
    caches = [r for r in runs if r["loader"] == "cache" and r["status"] == "completed"]
    for r in caches:
        size = size_label(r["origins"])
        worst = max((v for phase in ("train", "val") for w in idle_series(r, phase, "uss") for v in w), default=None)
        if bare_uss is not None:
            goals.append({"goal": f"cache worker USS ≤ bare worker USS + {uss_margin:.0f} MiB ({size})",
                          "measured": f"largest cache worker USS {fmt_number(worst)} MiB; bare worker {fmt_number(bare_uss)} MiB",
                          "met": worst is not None and worst <= bare_uss + uss_margin})
        for key, what in (("uss", "USS"), ("private_anon", "private anon")):
            drifts = [max(abs(v - w[0]) for v in w) for phase in ("train", "val")
                      for w in idle_series(r, phase, key) if w]
            drift = max(drifts) if drifts else None
            goals.append({"goal": f"cache worker {what} flat within ±{flat:.0f} MiB across epochs and the "
                                  f"start of validation ({size})",
                          "measured": f"largest change of a worker from the end of its first pass on: "
                                      f"{fmt_number(drift, 2)} MiB",
                          "met": drift is not None and drift <= flat})
    if len(caches) >= 2:
        for key, what in (("uss", "USS"), ("private_anon", "private anon")):
            ends = {r["origins"]: end_of_run_worker(r, key) for r in caches}
            diff = max(ends.values()) - min(ends.values())
            goals.append({"goal": f"cache worker {what} the same at every size (within {flat:.0f} MiB)",
                          "measured": ", ".join(f"{size_label(k)}: {fmt_number(v)} MiB" for k, v in sorted(ends.items())),
                          "met": diff <= flat})
    for r in caches:
        seed = next((s for s in runs if s["loader"] == "seed-initial" and s["origins"] == r["origins"]), None)
        if seed and seed["peak"]["pss_anon"] and r["peak"]["pss_anon"]:
            ratio = seed["peak"]["pss_anon"] / r["peak"]["pss_anon"]
            floor = ""  # what the processes cost beyond forked workers that load nothing
            if bare and bare["peak"]["pss_anon"]:
                b = bare["peak"]["pss_anon"]
                floor = (f"; above the {fmt_number(b, 0)} MiB of the bare loader's processes: "
                         f"+{fmt_number(seed['peak']['pss_anon'] - b, 0)} vs +{fmt_number(r['peak']['pss_anon'] - b, 0)} MiB")
            goals.append({"goal": f"Σ Pss_Anon ≥ {ratio_goal:.0f}× below seed-initial ({size_label(r['origins'])})",
                          "measured": f"peak {fmt_number(seed['peak']['pss_anon'], 0)} vs {fmt_number(r['peak']['pss_anon'], 0)}"
                                      f" MiB: {ratio:.1f}×{floor}",
                          "met": ratio >= ratio_goal})
    return goals


def goals_text(goals: list[dict]) -> str:
    return "\n".join(f"- {'met' if g['met'] else 'MISSED'}: {g['goal']} — {g['measured']}" for g in goals)
