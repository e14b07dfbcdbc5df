"""`VoxelCacheDataset`: training samples straight from memory-mapped cache files.

Why it stays small in every DataLoader worker:
- the constructor reads only the cache attributes and array headers; every file map
  and metadata array is opened lazily, in the process that uses it, and reopened
  after a fork or unpickle (it is never inherited from the parent);
- per-origin metadata are read-only ``np.memmap`` arrays, and image bytes are views of
  the shard files, so what a worker touches are page-cache pages shared by all
  workers; nothing per item is kept, and no cache grows;
- the object pickles to a few hundred bytes, so spawn and forkserver work too.
"""
from __future__ import annotations

import gc
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

from cache_tools import format as fmt
from cache_tools.read.budget import memory_budget
from cache_tools.read.lattice import LatticeReader
from cache_tools.read.reader import ShardReader
from cache_tools.read.batch import SampleBatch, batch_buffer
from cache_tools.read.selection import Selection, origin_arrays
from cache_tools.read.indexing import scalar_index
from cache_tools.read.lattice_samples import LatticeSamples
from cache_tools.read.normalize import affine_of
from cache_tools.read.structure_nav import StructureNavigation
from cache_tools.read.views import LatticeGeometry, check_view_options, mix, mix_array
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, N_CUBE_ROTATIONS

@dataclass
class _Local:
    """What one process has opened (memory-mapped metadata); never pickled or inherited."""
    pid: int
    structure_index: np.ndarray
    center: np.ndarray
    # (selected rows, their first origins, cumulative origin counts); None when
    # everything is selected (ids are indices) until a structure method needs it
    table: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    rotations: np.ndarray | None = None
    ids: tuple[np.ndarray, np.ndarray] | None = None
    meta: Any = None  # StructureColumns, opened on first structure_meta()


class VoxelCacheDataset(StructureNavigation, LatticeSamples, torch.utils.data.Dataset):
    """Map-style dataset over a voxel cache (or one split of it).

    ``ds[i]`` is a dict: ``image`` float32 tensor [C, L, L, L] (dequantized, the
    caller's to modify), ``origin_id`` int, ``structure_index`` int, ``center_A``
    float32 tensor [3], ``rotation`` int (stored rotation used, or 0),
    ``cube_rotation`` int (index into the 24 of :mod:`cache_tools.read.rotations` applied
    on top, 0 without ``rotate``); :meth:`rotation_matrix` composes the two.

    ``subset=NAME`` keeps the structures of a subset stored by ``cache-tools subset``
    (selected by metadata); with ``split=`` too, the structures in both.
    ``origins=NAME`` (lattice caches) reads the views at the centres of origin set NAME, stored by
    ``cache-tools origins``, instead of the build's origins: ``len``, ``origin_id`` (then an index
    into the set), ``center_A`` and the structure ranges all follow the set, and ``split``,
    ``subset`` and ``structures`` still select structures (those the set has no origin in drop out).
    :meth:`structure_meta` gives a structure's recorded metadata.

    Indices and ids: what the dataset TAKES is local to its selection (a split and/or subset):
    ``ds[i]``, ``len(ds)``, ``n_structures``, ``structure_id(k)``,
    ``origins_of_structure(k)`` (a range of local sample indices). What samples
    RETURN (``origin_id``, ``structure_index``) are global cache ids, the same in
    every split. Mappings: :meth:`origin_id` (local index -> origin id),
    :meth:`index_of` (origin id -> local index), :meth:`structure_row` (local
    structure -> global row) and :meth:`local_structure` (global row -> local).
    ``ds[i]`` takes ints, numpy integers and 0-d integer tensors; a list, 1-d array
    or slice returns a batch dict; floats and bools raise TypeError.

    ``rotate=True`` applies one of the 24 exact cube rotations; with a cache built
    with ``--rotations K`` one stored rotation is picked too. Both choices are
    reproducible functions of (seed, epoch, index); call :meth:`set_epoch` each
    epoch (it reaches persistent workers through a shared-memory counter).
    ``dequantize=False`` returns images in the stored dtype (uint8 or float16 caches: a
    quarter or half of the bytes to move and pin); multiply by ``ds.scale`` where the
    batch lands (``batch["image"].cuda().float() * ds.scale`` equals what the default gives).
    ``transform`` is applied to the image tensor. ``verify=True`` checks each
    origin's crc32 as it is read. ``structures`` (global structure rows, e.g. from
    :func:`cache_tools.commands.split.compute_splits`) restricts the dataset to them, within
    ``split`` if given: a split held in memory, the cache untouched (the array is
    pickled with the dataset, 8 bytes a structure). Image bytes come through a
    :class:`ShardReader` (``ds.reader``): at most ``max_maps`` shard maps (and
    descriptors) per process, compressed caches decoded on ``threads`` threads per batch.

    Batches: ``DataLoader(ds, batch_size=B, collate_fn=batch_collate)`` reads each
    batch with :meth:`__getitems__` into one buffer and hands it over without a
    second copy (``pin_memory=True`` allocates that buffer pinned when CUDA exists).

    ``prefetch`` asks the kernel for each batch's (or item's) pages at once
    (MADV_WILLNEED). ``None`` (the default) turns it on when the cache holds more than
    half of this process's memory budget (RAM, or the cgroup limit SLURM sets), i.e.
    when its pages cannot all stay cached: there it is 22x faster under a cap below
    the cache size; on a warm cache it costs about a quarter (BENCHMARKS.md).
    """

    def __init__(self, cache: str | os.PathLike, split: str | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 rotate: bool = False, seed: int = 0, verify: bool = False, pin_memory: bool = False,
                 prefetch: bool | None = None, structures: Sequence[int] | np.ndarray | None = None,
                 subset: str | None = None, max_maps: int | None = None, threads: int | None = None,
                 dequantize: bool = True, normalize_mean: Sequence[float] | None = None,
                 normalize_std: Sequence[float] | None = None, grid_voxels: int | None = None,
                 jitter_voxels: int = 0, origins: str | None = None):
        self.root = str(Path(cache).absolute())
        attrs = fmt.read_attrs(self.root)
        fmt.require_complete(self.root, attrs)
        fmt.require_params_intact(self.root, attrs)  # a hand-edited scale would rescale every image
        self.lattice = attrs.params.lattice is not None
        build_voxels = attrs.params.image.grid_voxels
        if self.lattice:  # views cut at training time
            self.layout = fmt.VoxelLayout(self.root, fmt.BLOCKS)
            self.reader = LatticeReader(self.root, threads=threads)
            self.geometry = LatticeGeometry(self.root, attrs)
            self.view_voxels = build_voxels if grid_voxels is None else grid_voxels
            check_view_options(self.view_voxels, jitter_voxels, "VoxelCacheDataset")
        else:
            if grid_voxels not in (None, build_voxels) or jitter_voxels:
                raise ValueError(f"{self.root}: grid_voxels/jitter_voxels need views cut at training time, and this "
                                 f"cache stores one {build_voxels}³ image per origin; build it with "
                                 "`pipeline build-cache --layout lattice`")
            self.layout = fmt.VoxelLayout(self.root)
            self.reader = ShardReader(self.layout, verify=verify, max_maps=max_maps, threads=threads)
            self.view_voxels = build_voxels
        mismatch = fmt.stored_problem(self.layout, attrs.params)  # a hand-edited voxels/zarr.json
        if mismatch is not None:
            raise fmt.CacheError(f"{self.root}: {mismatch} (damaged cache; run cache-tools check)")
        self.jitter_voxels = jitter_voxels
        self.selection = Selection.of(self.root, attrs, split, subset, structures, origins)
        self.origins = origins
        self._center_array, self._index_array, _ = origin_arrays(self.root, origins)
        self.n_origins = len(fmt.read_array(self.root, self._center_array))
        self.scale = attrs.scale
        self.dequantize = dequantize
        self.image_dtype = np.dtype(np.float32) if dequantize else self.layout.dtype
        self.n_rotations = attrs.params.rotations
        self.channels: list[list[str]] = [list(c) for c in attrs.params.channels]
        self.normalize_mean, self.normalize_std = normalize_mean, normalize_std
        self._a, self._b = affine_of(self.scale if dequantize else 1.0, len(self.channels),
                                   normalize_mean, normalize_std, dequantize)
        self._scale_out = float(self._a[0]) if self._a is not None else 1.0  # the plain path's one scale
        self.reader.warm(self.image_dtype)  # here, not in each DataLoader worker
        self.transform = transform
        self.rotate = rotate
        self.seed = seed
        self.verify = verify
        self.pin_memory = pin_memory
        if prefetch is None:
            prefetch = fmt.voxels_nbytes(self.layout, estimate=True) > memory_budget() // 2
        self.prefetch = prefetch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._state: _Local | None = None
        rows, _, cumulative = self.selection.table()  # not kept: reopened per process
        self._n_structures = len(rows)
        self._all = self._n_structures == len(fmt.read_array(self.root, fmt.STRUCTURE_ORIGIN_RANGE))
        self._len = self.n_origins if self._all else int(cumulative[-1])
        if (split is not None or subset is not None or origins is not None) and self._n_structures == 0:
            # an empty split is a mistake (a date past every deposition), never an empty epoch
            raise fmt.CacheError(f"{self.root}: {self.selection.describe()} holds no "
                                 + ("structure" if origins is None else "origin")
                                 + ("; `cache-tools info` counts each split's structures" if split is not None else ""))

    @property
    def split(self) -> str | None:
        return self.selection.split

    @property
    def subset(self) -> str | None:
        return self.selection.subset

    # --- lifecycle ---------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_state"] = None  # arrays (and the reader's maps) are reopened where they are used
        return state

    def _open(self) -> _Local:
        """Per-process state: opened on first use in each process, never inherited."""
        if torch.utils.data.get_worker_info() is not None:
            # In a DataLoader worker, everything that exists now was inherited from the
            # parent. Freezing it keeps Python's cyclic collector from walking those
            # objects, which writes their GC headers and so copies the parent's heap
            # into the worker page by page (the copy-on-read growth of issue 13246).
            gc.freeze()
        root = self.root
        self._state = _Local(os.getpid(), fmt.read_array(root, self._index_array),
                             fmt.read_array(root, self._center_array),
                             None if self._all else self.selection.table())
        return self._state

    def _local(self) -> _Local:
        state = self._state
        return state if state is not None and state.pid == os.getpid() else self._open()

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        state = self._local()
        if state.table is None:
            state.table = self.selection.table()
        return state.table

    # --- public API --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch for rotations; seen by already-running workers too."""
        self._epoch.fill_(int(epoch))

    def origin_id(self, index: int) -> int:
        """Global origin id of sample ``index`` of this dataset (split); negative counts from the end."""
        index = scalar_index(index)
        if index is None:
            raise TypeError("origin_id() takes one integer index")
        if not -self._len <= index < self._len:
            self._index_error(index)
        index %= self._len
        if self._all:
            return index
        return int(self._origin_ids(np.array([index]))[0])

    def index_of(self, origin_id: int) -> int:
        """Local sample index of global origin ``origin_id``: the inverse of :meth:`origin_id`.

        Raises ValueError (like ``list.index``) when the origin is in the cache but not
        in this selection, IndexError when it is not in the cache at all.
        """
        origin = operator.index(origin_id)
        if not 0 <= origin < self.n_origins:
            raise IndexError(f"origin id {origin} out of range for {self.n_origins} origins in the "
                             + ("cache" if self.origins is None else f"origin set {self.origins!r}"))
        if self._all:
            return origin
        row = int(self._local().structure_index[origin])
        rows, starts, cumulative = self._table()
        k = int(np.searchsorted(rows, row))
        if k == len(rows) or rows[k] != row:
            raise ValueError(f"origin id {origin} (structure row {row}) is not in {self.selection.describe()}")
        return int(cumulative[k] + origin - starts[k])

    def _origin_ids(self, indices: np.ndarray) -> np.ndarray:
        """Vectorized: sample indices (negative allowed) -> global origin ids."""
        state = self._local()
        if len(indices) and not (-self._len <= indices.min() and indices.max() < self._len):
            self._index_error(indices[(indices < -self._len) | (indices >= self._len)][0])
        indices = indices % self._len if self._len else indices
        if self._all:
            return indices
        _, starts, cumulative = state.table
        k = np.searchsorted(cumulative, indices, side="right") - 1
        return starts[k] + indices - cumulative[k]

    def _index_error(self, index: int):
        raise IndexError(f"index {index} out of range for {self._len} samples"
                         + (f" in {self.selection.describe()}" if self.selection.selective else ""))

    def _choices(self, index: int) -> tuple[int, int]:
        """(stored rotation, cube rotation) of sample ``index`` this epoch."""
        epoch = int(self._epoch)
        stored = mix(self.seed, epoch, index, 1) % self.n_rotations if self.n_rotations > 1 else 0
        cube = mix(self.seed, epoch, index, 2) % N_CUBE_ROTATIONS if self.rotate else 0
        return stored, cube

    def _choices_of(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_choices` of many samples at once: (stored rotations, cube rotations), int64."""
        n, epoch = len(indices), int(self._epoch)
        stored = (mix_array(self.seed, epoch, indices, 1) % np.uint64(self.n_rotations)).astype(np.int64) \
            if self.n_rotations > 1 else np.zeros(n, np.int64)
        cube = (mix_array(self.seed, epoch, indices, 2) % np.uint64(N_CUBE_ROTATIONS)).astype(np.int64) \
            if self.rotate else np.zeros(n, np.int64)
        return stored, cube

    def _image_shape(self) -> tuple[int, ...]:
        if self.lattice:
            return (len(self.channels), *(self.view_voxels,) * 3)
        return self.layout.image_shape[1:] if self.n_rotations > 1 else self.layout.image_shape

    def _read_one(self, origin: int, rotation: int, cube: int, out: np.ndarray) -> None:
        """One sample's image into ``out``: the one copy (or decode), dequantized, normalized
        and rotated on the way."""
        if self.n_rotations == 1 and not cube and self._b is None:
            self.reader.read_into(origin, out, float(self._a[0]) if self._a is not None else 1.0)
            return
        self.reader.read(np.array([origin], np.int64), out[None], np.array([rotation], np.int64),
                         np.array([cube], np.int64), self._a, self._b)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if type(index) is int and self._plain and -self._len <= index < self._len:
            return self._plain_item(index % self._len)  # the common case, in as little Python as it takes
        scalar = scalar_index(index)
        if scalar is None:  # a slice or a list of indices: a ready batch
            if isinstance(index, slice):
                index = range(*index.indices(self._len))
            return self.__getitems__(index).data
        origin = self.origin_id(scalar)
        index = scalar % self._len
        state = self._local()
        if self.lattice:
            return self._view_item(index, origin, state)
        if self.prefetch:
            self.reader.prefetch(np.array([origin]))
        rotation, cube = self._choices(index) if self.n_rotations > 1 or self.rotate else (0, 0)
        out = np.empty(self._image_shape(), dtype=self.image_dtype)
        self._read_one(origin, rotation, cube, out)
        image = torch.from_numpy(out)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "origin_id": origin,
                "structure_index": int(state.structure_index[origin]),
                "center_A": torch.from_numpy(state.center[origin].copy()),
                "rotation": rotation, "cube_rotation": cube}

    @property
    def _plain(self) -> bool:
        """ds[i] is the stored image of origin i, dequantized: the whole cache, no augmentation."""
        plain = self.__dict__.get("_plain_cached")
        if plain is None:
            plain = self._plain_cached = (self._all and not self.lattice and not self.rotate and self.n_rotations == 1
                                          and not self.prefetch and not self.verify and self.transform is None
                                          and self._b is None)
        return plain

    def _plain_item(self, origin: int) -> dict[str, Any]:
        state = self._state
        if state is None or state.pid != os.getpid():
            state = self._open()
        out = np.empty(self.layout.image_shape, self.image_dtype)
        image = torch.from_numpy(out)
        self.reader.read_into(origin, out, self._scale_out, image.data_ptr())  # torch's pointer: 15x cheaper
        return {"image": image, "origin_id": origin,
                "structure_index": int(state.structure_index[origin]),
                "center_A": torch.from_numpy(state.center[origin].copy()), "rotation": 0, "cube_rotation": 0}

    def __getitems__(self, indices: list[int]) -> "SampleBatch":
        """A whole batch in one buffer: PyTorch's batched-fetch hook.

        The reader reads the origins with one compiled call per thread (copied from the
        shard maps, or decoded when compressed), dequantized, normalized and rotated in
        the same pass, into a single [B, C, L, L, L] buffer (float32, or the stored dtype
        with ``dequantize=False``; pinned when ``pin_memory`` and CUDA is available). Returns a :class:`SampleBatch`: use
        ``collate_fn=batch_collate`` to take it as is; the default collate also works.
        """
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got {idx.dtype} ({type(indices).__name__})")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        origins = self._origin_ids(idx)
        idx = idx % self._len if self._len else idx
        state, n = self._state, len(origins)
        if self.lattice:
            data = self._read_views(idx, origins)
            if self.transform is not None:
                data["image"] = torch.stack([self.transform(img) for img in data["image"]])
            return SampleBatch(data)
        images = batch_buffer((n, *self._image_shape()), self.image_dtype, pin=self._pin())
        out = images.numpy()
        choices = np.zeros((n, 2), dtype=np.int64)
        if self.prefetch and n:
            self.reader.prefetch(np.unique(origins))
        if self.n_rotations > 1 or self.rotate:  # each sample has its own rotation
            choices[:, 0], choices[:, 1] = self._choices_of(idx)
            self.reader.read(origins, out, choices[:, 0], choices[:, 1], self._a, self._b)
        else:
            self.reader.read(origins, out, a=self._a, b=self._b)
        if self.transform is not None:
            images = torch.stack([self.transform(img) for img in images])
        data = {"image": images,
                "origin_id": torch.from_numpy(origins.astype(np.int64)),
                "structure_index": torch.from_numpy(state.structure_index[origins].astype(np.int64)),
                "center_A": torch.from_numpy(state.center[origins]),
                "rotation": torch.from_numpy(choices[:, 0].copy()),
                "cube_rotation": torch.from_numpy(choices[:, 1].copy())}
        return SampleBatch(data)

    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def rotation_matrix(self, sample: dict[str, Any]) -> torch.Tensor:
        """The rotation a sample's (or a batch's) image shows: float32 [3, 3] (or [B, 3, 3]).

        ``Q = M[cube_rotation] @ R[origin_id, rotation]``: the stored rotation ``R``
        (identity without ``--rotations``) turned the atoms about ``center_A`` before
        voxelizing, then the cube rotation ``M`` turned the image. An atom at ``x`` Å
        shows at centred voxel coordinate ``Q @ (x - center_A) / resolution_A``, along
        the image axes (x, y, z); rotate vector labels with the same ``Q``. On a lattice
        cache ``R`` is the rotation of the structure's lattice copy ``rotation``.
        """
        cube = CUBE_ROTATION_MATRICES[np.asarray(sample["cube_rotation"], dtype=np.int64)]
        if self.n_rotations > 1 and self.lattice:
            rows = np.atleast_1d(np.asarray(sample["structure_index"], dtype=np.int64))
            copies = np.atleast_1d(np.asarray(sample["rotation"], dtype=np.int64))
            stored = self.geometry.rotation(rows, copies).reshape(*np.shape(sample["rotation"]), 3, 3)
            return torch.from_numpy((cube.astype(np.float64) @ stored).astype(np.float32))
        if self.n_rotations > 1:
            state = self._local()
            if state.rotations is None:
                state.rotations = fmt.read_array(self.root, fmt.ROTATION)
            origin = np.asarray(sample["origin_id"], dtype=np.int64)
            stored = state.rotations[origin, np.asarray(sample["rotation"], dtype=np.int64)]
            return torch.from_numpy((cube.astype(np.float32) @ stored).astype(np.float32))
        return torch.from_numpy(cube.astype(np.float32))

    def __repr__(self) -> str:
        return (f"VoxelCacheDataset({self.root!r}, split={self.split!r}, subset={self.subset!r}, "
                f"origins={self.origins!r}, n={self._len}, "
                f"image={tuple(self.layout.image_shape[-4:])}, items=float32, "
                f"stored={self.layout.dtype.name}, "
                f"rotate={self.rotate}, stored_rotations={self.n_rotations}, prefetch={self.prefetch})")
