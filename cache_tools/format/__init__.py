"""The on-disk format of a voxel cache: the contract between the writer and every reader.

This package is the single owner of the format. The writer (`pipeline`) and every
reader (`cache_tools`) import it; nothing else spells a path inside a store.
It needs only the standard library and numpy (numcodecs to encode), so a training
process can read a cache without zarr, and it imports nothing else of the project.
One module per concern: ``names`` (array names, vocabularies, the date encoding),
``store`` (crash-safe files, JSON, single-chunk arrays), ``attrs`` (the typed cache
attributes), ``layout`` (shards and their index), ``codecs`` (an origin's codec chain).
Every public name is re-exported here: ``from cache_tools import format as fmt``.

A cache is a zarr v3 group (a directory)::

    CACHE/
      zarr.json                      group; attributes["voxel_cache"] = build attrs
      voxels/                        (N, C, L, L, L), or (N, R, C, L, L, L) with R rotations
        zarr.json                    sharding_indexed codec; inner chunk = one origin, raw or zstd
        c/<s>/0/0/0/0                shard s: origins [s*S, s*S + S), then the shard index
      origins/center_A               (N, 3) float32   voxel grid centre, in Å
      origins/structure_index        (N,)   int32     row of the structures table
      origins/crc32                  (N,)   uint32    zlib.crc32 of the origin's stored bytes
                                                      (before compression: the image as stored dtype)
      origins/rotation               (N, R, 3, 3) float32, only when R > 1
      structures/id_utf8, id_offsets               ragged UTF-8 ids (unique, from file names)
      structures/source_path_utf8, source_path_offsets
      structures/source_sha256       (M, 32) uint8
      structures/atom_count          (M,)   int32     heavy atoms voxelized
      structures/origin_range        (M, 2) int64     [start, stop); contiguous, tiling 0..N-1
      structures/split               (M,)   uint8     optional; codes name attrs.splits
      structures/method              (M,)   uint16    bit i set = METHODS[i] in _exptl.method
      structures/resolution_A        (M,)   float32   best of refinement/reconstruction; NaN absent
      structures/deposited           (M,)   int32     days since 1970-01-01; DATE_MISSING absent
      structures/released            (M,)   int32     (first release) days; DATE_MISSING absent
      structures/n_models            (M,)   int32     models in the file
      structures/polymer             (M,)   uint8     bit i set = POLYMERS[i] present (_entity_poly)
      structures/n_chains            (M,)   int32     chains (auth_asym_id) of the first model
      structures/subset/<NAME>       (K,)   int32     optional; sorted structure rows of a subset;
                                                      attrs.subsets[NAME] holds its expression
      structures/entry_id_utf8, entry_id_offsets   ragged PDB entry ids (mmCIF _entry.id,
                                     upper-cased); caches built before it: see entry_ids()
      structures/assembly_utf8, assembly_offsets   ragged; the assembly each structure's images
                                     hold (an _pdbx_struct_assembly.id, or "asym": the asymmetric
                                     unit); only in caches built with --assembly other than asym
                                     (see assemblies(): absent = all "asym")
      origin_sets/<NAME>/...         lattice caches: origin sets (format/lattice.py); attrs.origin_sets
    (attrs.metadata_crc32 holds the crc32 of each metadata array's data file)
      .build/                        resumable build state; removed when the build completes

Inside an uncompressed shard, origin ``j`` occupies bytes ``[j * B, (j + 1) * B)`` where
B is the bytes of one origin; the zarr shard index at the end of the file says the same,
so zarr reads the store normally while a training worker turns an origin id into
a file and an offset with two integer operations and memory-maps it.
With ``compression`` (``--compression zstd``) each origin is one zstd frame (zarr's
``zstd`` codec, numcodecs' implementation, with its content checksum on, so a damaged
frame fails to decode instead of decoding into garbage), written one after another; the
shard index (16 bytes per origin slot: offset, length) says where each frame is. The
format version stays 1: the codec is zarr's own metadata, and a reader that predates
compression refuses compressed voxels with a clear error.
Every metadata array is a single uncompressed chunk, so it is one raw file too.
"""
from __future__ import annotations

from cache_tools.format.attrs import (CacheAttrs, CacheParams, Compression, ImageParams, InputNote,
                                      OriginSetRecord, OriginsParams, StorageParams, SubsetRecord, VoxelizerParams,
                                      params_checksum, params_problem, read_attrs, replace_arrays,
                                      require_complete, require_params_intact, update_attrs, write_attrs)
from cache_tools.format.codecs import SUPPORTED_CODECS, Codec, encoder, inner_codecs
from cache_tools.format.lattice import *  # noqa: F401,F403  (the lattice layout's names)
from cache_tools.format.lattice import (LatticeParams, copy_frame, copy_offset, origin_set_array, origin_set_dir,
                                       snap_to_lattice, view_center, view_corner)
from cache_tools.format.layout import (EMPTY_INDEX_ENTRY, INDEX_ENTRY_NBYTES, VoxelLayout, entry_problem,
                                       shard_file, sharded_array_metadata, stored_problem, voxels_array_metadata,
                                       voxels_nbytes)
from cache_tools.format.names import *  # noqa: F401,F403  (array names, vocabularies, dates, name rules)
from cache_tools.format.names import (CacheError, check_assembly, check_name, date_to_days, days_to_date,
                                      entry_id_from_name, subset_array)
from cache_tools.format.store import (array_meta, array_metadata, assemblies, chunk_crc32, commit, discard,
                                      encode_ragged, entry_ids, file_sha256, group_metadata, metadata_checksums,
                                      publish, ragged_item, read_array, read_json, read_ragged_strings,
                                      remove_temporaries, single_chunk_path, stage, stage_arrays, write_array,
                                      write_json_atomic, write_ragged_strings)
