"""Build orchestration: inputs -> scan (parse + origins) -> layout -> voxelize shards -> publish.

Two phases over a dask.distributed cluster:

1. *scan* (``tasks.scan_task``), one task per batch of files: parse with gemmi, pick origins, keep the atoms
   in ``.build/atoms`` and the result in ``.build/scan``. Nothing in the store depends
   on the order tasks finish in.
2. *write* (``tasks.write_task``), one task per run of consecutive shards (``plan_write_tasks``): origin ids
   are assigned from the scan results in input order, so every task knows its shards'
   origins and writes files nobody else touches (concurrent partial writes to one shard
   would corrupt it). A task voxelizes each structure's lattice tiles once across its
   shards and publishes shard by shard.

Finished work is recorded per file and per shard, so rerunning the same command
after a crash resumes, and ends with the same bytes an uninterrupted run writes.
This module decides what runs; ``pipeline.cluster`` runs it on dask.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import pipeline
from cache_tools import format as fmt
from pipeline import metadata, write
from pipeline.cluster import dask_client, run_task, wait_all
from pipeline.errors import BuildError, InputError
from pipeline.inputs import expand_inputs, structure_ids
from pipeline.lock import BuildLock, LockedError
from pipeline.origins import OriginRule, OriginsFile, read_origins_file
from pipeline.parse import MMCIF_SUFFIXES
from pipeline.tasks import lattice_write_task, scan_task, shard_pieces, write_task
from pipeline.voxelize import ImageSpec, Storage, origin_rotations

TARGET_SHARD_BYTES = 256 * 2**20
LATTICE_SHARD_BYTES = 2**30  # the lattice's shard files are mapped, not opened per read: fewer is better
SCAN_BATCH = 4  # at most this many files per scan task: amortizes task overhead, keeps the bar lively
# A write task's size, at most (or one shard): ~10 s of one worker's work, so workers that join
# a --scheduler cluster after the build started still find tasks (a structure has <= 1,000
# origins by default, so tasks this long rarely cut one).
MAX_TASK_ORIGINS = 8192


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the bytes of a cache (compared on resume)."""

    channels: list[list[str]]
    image: ImageSpec
    storage: Storage
    rule: OriginRule
    rotations: int = 1
    origins_file: str | None = None
    origins_per_shard: int = 0  # 0 = automatic
    exact_centers: bool = False  # True: images centred on the origins as picked, voxelized one by one
    keep_duplicates: bool = False  # inputs with the same content as an earlier one are skipped
    compression: str = "none"   # fmt.COMPRESSIONS; the CLI defaults to fmt.DEFAULT_COMPRESSION
    compression_level: int = fmt.DEFAULT_COMPRESSION_LEVEL
    layout: str = "origins"     # fmt.LAYOUTS: one image per origin, or each structure's lattice once
    block_edge: int = fmt.DEFAULT_BLOCK_EDGE  # the lattice layout's blocks
    # Which atoms: "asym", "first", an assembly id, or "origins" (the --origins file's assembly
    # column); None: the file's column when it has one, else "asym" (build_cache resolves it).
    assembly: str | None = None
    occupancy: str = "one"      # fmt.OCCUPANCIES

    def cache_params(self, sources: list[Path]) -> fmt.CacheParams:
        """The format's record of these parameters and inputs: equal records resume a build."""
        origins = (fmt.OriginsParams(**self.rule.to_attrs()) if not self.origins_file else
                   fmt.OriginsParams("file", seed=self.rule.seed,  # the seed still draws --rotations
                                     path=str(self.origins_file), sha256=fmt.file_sha256(self.origins_file)))
        return fmt.CacheParams(
            channels=tuple(tuple(c) for c in self.channels),
            image=fmt.ImageParams(**asdict(self.image)),
            voxelizer=fmt.VoxelizerParams(**self.image.voxelizer_attrs(self.occupancy)),
            storage=self.storage.params(),
            origins=origins,
            rotations=self.rotations,
            centers="exact" if self.exact_centers else "lattice",
            origins_per_shard=self.origins_per_shard,
            inputs_sha256=hashlib.sha256("\n".join(map(str, sources)).encode("utf-8", "surrogateescape")).hexdigest(),
            n_inputs=len(sources),
            keep_duplicates=self.keep_duplicates,
            compression=(fmt.Compression(self.compression, self.compression_level)
                         if self.compression != "none" else None),
            lattice=fmt.LatticeParams(self.block_edge) if self.layout == "lattice" else None,
            assembly=self.assembly or fmt.ASSEMBLY_ASYM, occupancy=self.occupancy)

    @classmethod
    def from_cache(cls, params: fmt.CacheParams) -> "BuildParams":
        """The parameters a cache was built with (to re-voxelize its origins)."""
        rule = params.origins
        return cls(
            channels=[list(c) for c in params.channels], image=ImageSpec(**params.image.to_json()),
            storage=Storage(params.storage.dtype, params.storage.uint8_max if params.storage.uint8_max is not None
                            # caches that did not record it stored 255 steps of their scale
                            else 255 * params.storage.scale if params.storage.dtype == "uint8"
                            else fmt.UINT8_DEFAULT_MAX),
            rule=OriginRule(seed=rule.seed) if rule.rule == "file" else OriginRule(
                rule.min_neighbors, rule.neighbor_radius_A, rule.min_spacing_A, rule.max_per_structure, rule.seed),
            rotations=params.rotations, origins_file=rule.path, origins_per_shard=params.origins_per_shard,
            keep_duplicates=params.keep_duplicates, exact_centers=not params.snapped,
            assembly=params.assembly, occupancy=params.occupancy,
            **({"compression": params.compression.codec, "compression_level": params.compression.level}
               if params.compression else {}),
            **({"layout": "lattice", "block_edge": params.lattice.block_edge} if params.lattice else {}))


@dataclass
class BuildSummary:
    out: str
    structures_ok: int = 0
    failures: list[fmt.InputNote] = field(default_factory=list)
    origins: int = 0
    bytes_on_disk: int = 0
    elapsed_s: float = 0.0
    resumed: bool = False
    already_complete: bool = False
    saturated_voxels: int = 0
    duplicates: list[fmt.InputNote] = field(default_factory=list)
    empty: list[fmt.InputNote] = field(default_factory=list)  # --origins rows with no atom in their image
    asym_fallbacks: list[fmt.InputNote] = field(default_factory=list)  # an assembly asked, none recorded
    peak_worker_rss_bytes: dict | None = None  # {"scan"|"voxelize": a worker's largest peak RSS in a task}


def plan_write_tasks(pending: list[int], per_shard: int, n_origins: int, ranges: np.ndarray,
                     target_origins: int) -> list[list[int]]:
    """Group pending shards into write tasks of about ``target_origins`` each.

    Shards are small next to a structure when a cache is small (at least 64 of them), and
    a structure cut between tasks voxelizes the atoms near each cut twice (or, cut into
    shard-size pieces, 3.8x the lattice work on the samples). So a task runs over
    consecutive shards and ends, once it has ``target_origins``, at the first shard
    boundary within one shard of a structure's end (or at twice the target).
    """
    starts, stops = ranges[:, 0], ranges[:, 1]

    def near_structure_end(boundary: int) -> bool:
        k = int(np.searchsorted(stops, boundary, side="left"))  # the structure containing it, or ending at it
        return k >= len(stops) or min(boundary - starts[k], stops[k] - boundary) < per_shard

    tasks: list[list[int]] = []
    count = 0
    for shard in pending:
        if not tasks or shard != tasks[-1][-1] + 1 or count >= target_origins and (
                near_structure_end(shard * per_shard) or count >= 2 * target_origins):
            tasks.append([])
            count = 0
        tasks[-1].append(shard)
        count += min(per_shard, n_origins - shard * per_shard)
    return tasks


# --- orchestration ----------------------------------------------------------------------

def build_cache(inputs: list[str], out: str | os.PathLike, params: BuildParams, *,
                workers: int | None = None, scheduler: str | None = None,
                overwrite: bool = False, progress: bool = True,
                log=print) -> BuildSummary:
    """Build (or resume) the cache at ``out``; see the module docstring."""
    started = time.time()
    # Through any symlink: the lock, the checks and --overwrite's replacement all act on the
    # directory itself (a link and its target are one cache; --overwrite keeps the link).
    root = Path(os.path.realpath(out))
    sources = expand_inputs(inputs)
    if not sources:
        raise InputError(f"no mmCIF files ({', '.join(MMCIF_SUFFIXES)}) found in {' '.join(inputs)}")
    ids = structure_ids(sources)
    listed = None
    if params.origins_file:
        try:
            listed = read_origins_file(params.origins_file)
        except OSError as exc:
            raise InputError(f"{params.origins_file}: cannot read origins file ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise InputError(str(exc)) from None
        unknown = sorted(set(listed.structures) - set(ids))
        if unknown:
            raise InputError(f"{params.origins_file}: {len(unknown)} structure ids match no input file: "
                             f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} "
                             f"(ids are file names without .cif/.cif.gz, e.g. {ids[0]})")
    if listed is not None and listed.has_assembly:
        if params.assembly is not None:
            raise InputError(f"--assembly {params.assembly} and the assembly column of {params.origins_file} "
                             "both choose the assemblies; give one of them")
        params = dataclasses.replace(params, assembly=fmt.ASSEMBLY_FROM_ORIGINS)
    elif params.assembly is None or params.assembly == fmt.ASSEMBLY_FROM_ORIGINS:
        params = dataclasses.replace(params, assembly=fmt.ASSEMBLY_ASYM)
    fingerprint = params.cache_params(sources)
    try:
        lock = BuildLock(root).__enter__()
    except LockedError as exc:
        raise InputError(str(exc)) from None
    try:
        return _build(root, sources, ids, listed, fingerprint, params, workers, scheduler, overwrite,
                      progress, started)
    finally:
        lock.__exit__(None, None, None)


def _build(root: Path, sources: list[Path], ids: list[str], listed, fingerprint: fmt.CacheParams, params: BuildParams,
           workers: int | None, scheduler: str | None, overwrite: bool, progress: bool,
           started: float) -> BuildSummary:
    """build_cache's work, under the cache's lock."""
    summary = BuildSummary(out=str(root))
    summary.resumed = _prepare_store(root, fingerprint, overwrite)
    if summary.resumed:
        fmt.remove_temporaries(root)  # of writes a crash interrupted: they may fill a disk
    attrs = fmt.read_attrs(root)
    if attrs.no_usable_input:  # the last attempt's verdict; this one scans again and decides anew
        attrs = fmt.update_attrs(root, failures=(), build={k: v for k, v in attrs.build.items()
                                                           if k != "no_usable_input"})
    if attrs.complete:
        summary.already_complete = True
        return _summarize(root, attrs, summary, started)

    with dask_client(workers, scheduler) as client:
        # Phase 1: scan.
        t_scan = time.time()
        todo = [(i, str(src), ids[i]) for i, src in enumerate(sources)
                if not write.scan_path(root, i).exists()]
        workers = max(1, sum(client.nthreads().values()))
        per_task = max(1, min(SCAN_BATCH, len(todo) // (16 * workers)))  # small builds: balance first
        batches = [todo[k:k + per_task] for k in range(0, len(todo), per_task)]
        listed_future = client.scatter(listed.structures, broadcast=True) if listed is not None else None
        box_half = params.image.grid_voxels * params.image.resolution_A / 2 + params.image.atom_radius_A
        lattice = ((params.block_edge, params.rotations, params.rule.seed) if params.layout == "lattice" else None)
        assembly = fmt.ASSEMBLY_ASYM if params.assembly == fmt.ASSEMBLY_FROM_ORIGINS else params.assembly
        futures = [client.submit(run_task, scan_task, str(root), b, params.channels, params.rule, listed_future,
                                 None if params.exact_centers else params.image, box_half, lattice, assembly,
                                 params.occupancy, pure=False)
                   for b in batches]
        scanned = wait_all(futures, total=len(sources), initial=len(sources) - len(todo), desc="scan",
                           unit="file", progress=progress, weight=lambda r: len(r[0]))

        # Layout: origin ids from scan results in input order.
        table = _collect_scan(root, sources, ids, params.keep_duplicates)
        if table.missing_assemblies:
            # The input named an assembly a file does not define: a usage error, as an unknown
            # --origins id is. Drop the build state, so the corrected command starts afresh.
            shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)
            raise InputError(_missing_assembly_message(table.missing_assemblies, params, listed))
        if table.n_origins == 0:
            _record_no_usable_input(root, table.failures)
            raise BuildError(f"no usable input: all {len(table.failures)} inputs failed (see FAILED lines); "
                             "fix or replace them, then build again", failures=table.failures)
        layout = _write_layout(root, params, table, listed) if params.layout == "origins" else \
            _write_lattice_layout(root, params, table, listed)

        # Phase 2: write shards (of origins' images, or of lattice blocks).
        t_write = time.time()
        pending = [s for s in range(layout.n_shards) if not write.shard_is_done(root, layout, s)]
        pending_items = sum(layout.origins_in_shard(s) for s in pending)
        workers = max(1, sum(client.nthreads().values()))  # again: a cluster's workers may still be arriving
        if params.layout == "lattice":
            ranges, unit = table.block_ranges, "block"
            per_task = MAX_TASK_ORIGINS * 4  # blocks are ~4x cheaper than images (fewer, and cut, not cropped)
            pieces_of = lambda shards: shard_pieces(ranges, list(zip(table.file_index, range(len(ranges)))),  # noqa: E731
                                                    layout, shards)
            submit = lambda shards: client.submit(run_task, lattice_write_task, str(root), shards,  # noqa: E731
                                                  pieces_of(shards), params.image, params.storage, pure=False)
        else:
            ranges, unit, per_task = table.ranges, "origin", MAX_TASK_ORIGINS
            submit = lambda shards: client.submit(  # noqa: E731
                run_task, write_task, str(root), shards, shard_pieces(table.ranges, table.file_index, layout, shards),
                params.image, params.storage, params.rotations, None, not params.exact_centers, pure=False)
        target = min(-(-pending_items // (8 * workers)), per_task)
        tasks = plan_write_tasks(pending, layout.origins_per_shard, layout.n_origins, ranges, target_origins=target)
        futures = [submit(shards) for shards in tasks]
        written = wait_all(futures, total=layout.n_origins, initial=layout.n_origins - pending_items,
                           desc="voxelize", unit=unit, progress=progress, weight=lambda r: r[1])
        t_end = time.time()

    # Publish: checksums, then the completion flag, then drop the build state.
    fmt.remove_temporaries(root)  # of tasks whose worker died mid-write (their task ran again)
    done = [write.read_done(root, s) for s in range(layout.n_shards)]
    if params.layout == "lattice":
        fmt.write_array(root, fmt.BLOCK_CRC32, np.concatenate([d["crc32"] for d in done]))
        fmt.write_array(root, fmt.BLOCK_FILL, np.concatenate([d["fill"] for d in done]).astype(np.uint16))
    else:
        fmt.write_array(root, fmt.CRC32, np.concatenate([d["crc32"] for d in done]))
    saturated = sum(int(d["saturated"]) for d in done)
    elapsed = time.time() - started
    splits = {}
    if listed is not None and listed.has_split:  # stored as `cache-tools split` stores them
        splits = {"splits": split_names(listed), "split_params": {"origins_file": str(params.origins_file)}}
    attrs = fmt.update_attrs(
        root, complete=True, params_crc32=fmt.params_checksum(fingerprint), failures=tuple(table.failures),
        duplicates=tuple(table.duplicates), empty=tuple(table.empty), asym_fallbacks=tuple(table.asym_fallbacks),
        metadata_crc32=fmt.metadata_checksums(root), **splits,
        build={**attrs.build,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "elapsed_s_last_run": round(elapsed, 2), "resumed": summary.resumed,
               "saturated_voxels": saturated,
               "phase_s": {"scan": round(t_write - t_scan, 3), "voxelize": round(t_end - t_write, 3)},
               "peak_worker_rss_bytes": {"scan": max((r[1] for r in scanned), default=None),
                                         "voxelize": max((r[2] for r in written), default=None)}})
    shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)
    return _summarize(root, attrs, summary, started)


def _prepare_store(root: Path, fingerprint: fmt.CacheParams, overwrite: bool) -> bool:
    """Create the store, or check an existing one matches; returns True when resuming."""
    if root.exists():
        if not root.is_dir():
            raise InputError(f"{root}: exists and is not a directory")
        try:
            attrs = fmt.read_attrs(root)
        except fmt.CacheError:
            attrs = None
        if attrs is not None and attrs.params == fingerprint:
            return True  # same parameters and inputs: resume (or nothing to do), --overwrite or not
        # A build stopped before its first zarr.json (disk full, kill) leaves only these.
        if attrs is None and any(p.name != fmt.BUILD_DIR and not p.name.startswith(".zarr.json.tmp-")
                                 for p in root.iterdir()):
            raise InputError(f"{root}: exists and is not a voxel cache; refusing to write into it "
                             "(choose another --out)")
        if attrs is not None and not overwrite and _has_finished_work(root, attrs):
            raise InputError(f"{root}: existing cache was built with other parameters or inputs "
                             f"({describe_changes(attrs.params.to_json(), fingerprint.to_json())}); "
                             "pass --overwrite to replace it")
        if attrs is not None:
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / fmt.BUILD_DIR).mkdir(exist_ok=True)
    fmt.write_attrs(root, fmt.CacheAttrs(
        params=fingerprint, complete=False, pipeline_version=pipeline.__version__,
        build={"started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    return False


def _record_no_usable_input(root: Path, failures: list[fmt.InputNote]) -> None:
    """Every input failed: say so in the store (`info` and `check` tell the user to fix the
    inputs, not to rerun), and drop the scan results, so that the same command scans inputs
    fixed in place again instead of replaying their failures."""
    shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)
    (root / fmt.BUILD_DIR).mkdir()
    fmt.update_attrs(root, lambda a: a.replace(failures=tuple(failures),
                                               build={**a.build, "no_usable_input": True}))


def _has_finished_work(root: Path, attrs: fmt.CacheAttrs) -> bool:
    """Whether a store holds anything a rebuild would redo: a complete cache, a structure
    parsed with origins (its atoms are kept), or a written shard. A store left by a build
    that failed or stopped before any of that (every input failed, no scheduler) is not."""
    return attrs.complete or any(
        any(write.build_dir(root, part).glob("*")) for part in ("atoms", "done") if write.build_dir(root, part).is_dir())


# What a user changed, in the options' own terms (fingerprint key -> how to say it).
_PARAM_NAMES = {"channels": "--channels", "image": "--grid-voxels/--resolution/--atom-radius",
                "voxelizer": "the macromol_voxelize version", "storage": "--dtype/--uint8-max",
                "origins": "the origin rule (--min-neighbors, --neighbor-radius, --min-spacing, "
                           "--max-origins-per-structure, --seed or --origins)",
                "rotations": "--rotations", "origins_per_shard": "--origins-per-shard",
                "assembly": "--assembly", "occupancy": "--occupancy"}
# Keys written only when they differ from these (caches built before them lack them).
_PARAM_DEFAULTS = {"assembly": fmt.ASSEMBLY_ASYM, "occupancy": fmt.OCCUPANCIES[0], "keep_duplicates": False}


def describe_changes(before: dict, now: dict) -> str:
    """'the input file list differs: 13 inputs before, 1 now; --rotations differs: 1 before, 3 now'."""
    parts = []
    if before.get("inputs_sha256") != now.get("inputs_sha256") or before.get("n_inputs") != now.get("n_inputs"):
        parts.append(f"the input file list differs: {before.get('n_inputs', '?')} inputs before, "
                     f"{now.get('n_inputs')} now")
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, _PARAM_DEFAULTS.get(key)), now.get(key, _PARAM_DEFAULTS.get(key))
        if key in ("inputs_sha256", "n_inputs") or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                    and not (key == "voxelizer" and k == "occupancy")]  # that one is --occupancy's, said below
            if not diff:
                continue
            detail = ", ".join(f"{k} {old.get(k)} before, {new.get(k)} now" for k in diff)
        else:
            detail = f"{old} before, {new} now"
        parts.append(f"{_PARAM_NAMES.get(key, key)} differs: {detail}")
    return "; ".join(parts) or "parameters differ"


@dataclass
class ScanTable:
    """The scan's outcome in input order: the structures kept (one row each) and the inputs left out."""

    file_index: list[int] = field(default_factory=list)   # input file of each structure
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    entry_ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)       # hex
    n_atoms: list[int] = field(default_factory=list)
    centers: list[np.ndarray] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)        # metadata.scan_fields of each
    failures: list[fmt.InputNote] = field(default_factory=list)    # path, id, reason
    duplicates: list[fmt.InputNote] = field(default_factory=list)  # path, id, same_as
    empty: list[fmt.InputNote] = field(default_factory=list)       # path, id, reason
    assemblies: list[str] = field(default_factory=list)   # the assembly each structure's atoms are
    asym_fallbacks: list[fmt.InputNote] = field(default_factory=list)  # path, id, reason
    missing_assemblies: list[tuple[str, str, str, str]] = field(default_factory=list)  # path, id, asked, reason
    ranges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [start, stop) origins
    lattices: list[dict] = field(default_factory=list)    # lattice layout: scan's lattice_* fields of each
    block_ranges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [start, stop) blocks

    @property
    def n_origins(self) -> int:
        return int(self.ranges[-1, 1]) if len(self.ranges) else 0


def _collect_scan(root: Path, sources: list[Path], ids: list[str], keep_duplicates: bool = False) -> ScanTable:
    table = ScanTable()
    first_with: dict[str, int] = {}  # content sha256 -> first input with it
    for i, src in enumerate(sources):
        res = write.load_npz(write.scan_path(root, i))
        if "usage" in res:
            table.missing_assemblies.append((str(src), ids[i], str(res["usage"]), str(res["reason"])))
            continue
        if "reason" in res:
            table.failures.append(fmt.InputNote(str(src), ids[i], reason=str(res["reason"])))
            continue
        sha = str(res["sha256"])
        if sha in first_with and not keep_duplicates:  # same bytes: the same images again
            table.duplicates.append(fmt.InputNote(str(src), ids[i], same_as=ids[first_with[sha]]))
            continue
        first_with.setdefault(sha, i)
        if str(res.get("empty_origins", "")):
            table.empty.append(fmt.InputNote(str(src), ids[i], reason=str(res["empty_origins"])))
        table.entry_ids.append(str(res["entry_id"]) if "entry_id" in res.keys() and str(res["entry_id"])
                               else fmt.entry_id_from_name(ids[i]))
        table.assemblies.append(str(res["assembly"]) if "assembly" in res else fmt.ASSEMBLY_ASYM)
        if str(res.get("assembly_note", "")):
            table.asym_fallbacks.append(fmt.InputNote(str(src), ids[i], reason=str(res["assembly_note"])))
        table.file_index.append(i)
        table.ids.append(ids[i])
        table.paths.append(str(src))
        table.centers.append(res["centers"])
        table.n_atoms.append(int(res["n_atoms"]))
        table.sha256.append(sha)
        table.meta.append({k: v for k, v in res.items() if k.startswith("meta_")})
        if "lattice_cells" in res:
            table.lattices.append({k: v for k, v in res.items() if k.startswith("lattice_")})
    counts = np.array([len(c) for c in table.centers], dtype=np.int64)
    stops = np.cumsum(counts)
    if len(counts):
        table.ranges = np.stack([stops - counts, stops], axis=1)
    if table.lattices:
        blocks = np.array([int(lat["lattice_count"].sum()) for lat in table.lattices], dtype=np.int64)
        ends = np.cumsum(blocks)
        table.block_ranges = np.stack([ends - blocks, ends], axis=1)
    return table


def origins_per_shard(n_origins: int, origin_nbytes: int) -> int:
    """Shards of ~256 MiB for big caches; at least 64 shards for small ones (parallel writes)."""
    return max(1, min(TARGET_SHARD_BYTES // origin_nbytes, -(-n_origins // 64)))


def _write_tables(root: Path, params: BuildParams, table: ScanTable, listed: OriginsFile | None = None) -> None:
    """The origin and structure tables every layout has (and the splits an --origins file gives)."""
    structure_index = np.repeat(np.arange(len(table.ids), dtype=np.int32),
                                table.ranges[:, 1] - table.ranges[:, 0])
    fmt.write_array(root, fmt.CENTER, np.concatenate(table.centers).astype(np.float32))
    fmt.write_array(root, fmt.STRUCTURE_INDEX, structure_index)
    fmt.write_ragged_strings(root, fmt.STRUCTURE_ID, table.ids)
    fmt.write_ragged_strings(root, fmt.STRUCTURE_SOURCE_PATH, table.paths)
    fmt.write_ragged_strings(root, fmt.STRUCTURE_ENTRY_ID, table.entry_ids)
    if params.assembly != fmt.ASSEMBLY_ASYM:  # absent: every structure is its asymmetric unit
        fmt.write_ragged_strings(root, fmt.STRUCTURE_ASSEMBLY, table.assemblies)
    if listed is not None and listed.has_split:
        names = split_names(listed)
        fmt.write_array(root, fmt.STRUCTURE_SPLIT,
                        np.array([names.index(listed.structures[sid].split) for sid in table.ids], dtype=np.uint8))
    fmt.write_array(root, fmt.STRUCTURE_SHA256,
                    np.array([np.frombuffer(bytes.fromhex(h), np.uint8) for h in table.sha256]))
    fmt.write_array(root, fmt.STRUCTURE_ATOM_COUNT, np.array(table.n_atoms, dtype=np.int32))
    fmt.write_array(root, fmt.STRUCTURE_ORIGIN_RANGE, table.ranges.astype(np.int64))
    metadata.write_columns(root, table.meta)


def blocks_per_shard(n_blocks: int, block_nbytes: int) -> int:
    """Shards of ~1 GiB of raw blocks: few files (a reader maps them all), at least 64 for small caches."""
    return max(1, min(LATTICE_SHARD_BYTES // block_nbytes, -(-n_blocks // 64)))


def _write_lattice_layout(root: Path, params: BuildParams, table: ScanTable,
                          listed: OriginsFile | None = None) -> fmt.VoxelLayout:
    """Tables, lattice arrays (block ids assigned lattice by lattice in storage order), blocks metadata."""
    _write_tables(root, params, table, listed)
    lats = table.lattices
    grid = np.concatenate([np.concatenate([lat["lattice_corner"], lat["lattice_dims"]], axis=1) for lat in lats])
    cells_per_map = np.prod(grid[:, 3:], axis=1)
    map_start = np.concatenate([[0], np.cumsum(cells_per_map)]).astype(np.int64)
    counts = np.concatenate([lat["lattice_count"] for lat in lats])
    block_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    block_map = np.full(int(map_start[-1]), fmt.EMPTY_BLOCK, np.int32)
    lattice = 0
    for lat in lats:
        offsets = np.concatenate([[0], np.cumsum(lat["lattice_count"])])
        for copy in range(len(lat["lattice_count"])):
            cells = lat["lattice_cells"][offsets[copy]:offsets[copy + 1]]
            block_map[map_start[lattice] + cells] = block_start[lattice] + np.arange(len(cells), dtype=np.int32)
            lattice += 1
    fmt.write_array(root, fmt.LATTICE_GRID, grid.astype(np.int32))
    fmt.write_array(root, fmt.LATTICE_MAP_START, map_start)
    fmt.write_array(root, fmt.LATTICE_BLOCK_START, block_start)
    fmt.write_array(root, fmt.LATTICE_MAP, block_map)
    if params.rotations > 1:
        fmt.write_array(root, fmt.LATTICE_ROTATION, np.stack([lat["lattice_rotation"] for lat in lats]))
        fmt.write_array(root, fmt.LATTICE_ROTATION_CENTER, np.stack([lat["lattice_center"] for lat in lats]))
    edge, n_blocks = params.block_edge, int(block_start[-1])
    block_nbytes = edge ** 3 * params.image.n_channels * np.dtype(params.storage.dtype).itemsize
    blocks_dir = root / fmt.BLOCKS
    blocks_dir.mkdir(exist_ok=True)
    fmt.write_json_atomic(blocks_dir / "zarr.json", fmt.sharded_array_metadata(
        n_blocks, (edge, edge, edge, params.image.n_channels), params.storage.dtype,
        params.origins_per_shard or blocks_per_shard(n_blocks, block_nbytes),
        compression=params.compression, level=params.compression_level))
    return fmt.VoxelLayout(root, fmt.BLOCKS)


def _write_layout(root: Path, params: BuildParams, table: ScanTable, listed: OriginsFile | None = None
                  ) -> fmt.VoxelLayout:
    n = table.n_origins
    image_shape = params.image.shape if params.rotations == 1 else (params.rotations, *params.image.shape)
    origin_nbytes = int(np.prod(image_shape)) * np.dtype(params.storage.dtype).itemsize
    per_shard = params.origins_per_shard or origins_per_shard(n, origin_nbytes)
    _write_tables(root, params, table, listed)
    if params.rotations > 1:
        mats = np.stack([origin_rotations(params.rule.seed, o, params.rotations) for o in range(n)])
        fmt.write_array(root, fmt.ROTATION, mats.astype(np.float32))
    voxels_dir = root / fmt.VOXELS
    voxels_dir.mkdir(exist_ok=True)
    fmt.write_json_atomic(voxels_dir / "zarr.json", fmt.voxels_array_metadata(
        n, image_shape, params.storage.dtype, per_shard, compression=params.compression,
        level=params.compression_level))
    return fmt.VoxelLayout(root)


def _summarize(root: Path, attrs: fmt.CacheAttrs, summary: BuildSummary, started: float) -> BuildSummary:
    summary.origins = len(fmt.read_array(root, fmt.CENTER))
    summary.structures_ok = len(fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT))
    summary.failures = list(attrs.failures)
    summary.bytes_on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    summary.elapsed_s = time.time() - started
    summary.saturated_voxels = attrs.saturated_voxels
    summary.duplicates = list(attrs.duplicates)
    summary.empty = list(attrs.empty)
    summary.asym_fallbacks = list(attrs.asym_fallbacks)
    summary.peak_worker_rss_bytes = attrs.build.get("peak_worker_rss_bytes")
    return summary


def split_names(listed: OriginsFile) -> tuple[str, ...]:
    """The split names of an --origins file with a split column, coded as `cache-tools split`
    codes them: train, val, test, then any other name in the order the file first uses it."""
    from cache_tools.commands.split import SPLIT_NAMES

    names = list(SPLIT_NAMES)
    for rows in listed.structures.values():
        if rows.split not in names:
            names.append(rows.split)
    if len(names) > 255:
        raise InputError(f"{listed.path}: {len(names)} split names; at most 255 fit the uint8 split codes")
    return tuple(names)


def _missing_assembly_message(missing: list[tuple[str, str, str, str]], params: BuildParams,
                              listed: OriginsFile | None) -> str:
    """One line: the first input whose named assembly does not exist, where it was named."""
    path, sid, asked, reason = missing[0]
    more = f" (and {len(missing) - 1} more inputs)" if len(missing) > 1 else ""
    if listed is not None and listed.has_assembly and sid in listed.structures:
        return f"{listed.where(sid)}: structure {sid} ({path}): {reason}{more}"
    return f"--assembly {asked}: {sid} ({path}): {reason}{more}"
