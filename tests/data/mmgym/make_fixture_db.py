#!/usr/bin/env python3
"""Build a small, real macromol_gym training database from the sample mmCIFs.

It runs the *real* pipeline of the macromol_gym authors, as library calls
(the same calls their own test `make_db/tests/test_pick.py::
test_pick_training_zones_1ypi_2ypi_3ypi` makes), with only the inputs that need
the network replaced by deterministic local equivalents:

  census (macromol_census 0.3.0, an in-memory DuckDB):
    mmc.init_db -> mmc.ingest_structures(<mmCIFs>)                 [= mmc_ingest_structures]
    mmc.update_structure_ranks(mmc.rank_structures())              [= mmc_rank_structures]
    mmc.insert_assembly_ranks(mmc.rank_assemblies())               [= mmc_rank_assemblies]
    mmc.insert_entity_clusters(find_identical_ligands())           [= mmc_find_identical_ligands]
    mmc.insert_entity_clusters(<polymers with identical sequence>) [stands in for mmc_ingest_entity_clusters,
                                                                    whose input is an MMseqs2 clustering of the whole PDB]
  training db (macromol_gym 1.1.0, SQLite):
    mmg.open_db(rwc) -> mmg.init_db                                [= mmg_init]
    pick._insert_config(Config) + pick_polymer_labels + pick_cath_labels(<no CATH>)
    mmg.pick_training_zones(...)                                   [= mmg_pick_training_examples]
    mmg.make_splits(...) -> mmg.update_splits(...)                 [= mmg_split_training_examples; the clusters CSV
                                                                    normally comes from mmg_fetch_interpro_clusters
                                                                    (InterPro web API); here: structures that share a
                                                                    polymer-sequence cluster are one group]

Config = the values the authors use in their own test of pick_training_zones
(make_db/tests/test_pick.py), except the element whitelist and the
non-biological residue list (see CONFIG).  Entries: 6 of the 13 samples
(ENTRIES), chosen so the file stays < 200 KB; 3 of them (171l, 1aa5, 1c58)
are rejected by the pipeline itself (no zone passes the density/neighbor
checks), 3 are stored: 3fy3 (10 zones), 1ypi (13), 1qjg (1) = 24 zones.

Needs macromol_gym's own packages, which voxel-cache does not depend on (they are
only needed to REMAKE the fixture; the tests read the committed .sqlite). Versions
matter: macromol_census 0.3.0 needs polars 1.x (2.x removed Expr.flatten; 1.44 breaks
rank_assemblies) and duckdb < 2 (2.x removed DuckDBPyConnection.pl). In a fresh venv:

    python3 -m venv /tmp/mmgym && . /tmp/mmgym/bin/activate
    pip install "torch==2.13.0" macromol_gym==1.1.0 macromol_census==0.3.0 \
        macromol_dataframe==0.9.0 macromol_voxelize==0.10.0 gemmi==0.7.5 \
        "polars==1.17.1" "duckdb<2"
    pip uninstall -y polars-runtime-32    # only if a polars 2.x was installed before

Run (from anywhere; the inputs are tests/data/mmcif of this repository):

    python tests/data/mmgym/make_fixture_db.py [OUT.sqlite]

Default OUT: mmgym_fixture.sqlite next to this script (173,056 bytes). ~4 s wall
(1.4 s of work, the rest imports), ~380 MB peak RSS. Deterministic: byte-identical
output on reruns (md5 7618a41df6385814ae0c7ec9ad9bbd78 with macromol_gym 1.1.0,
macromol_census 0.3.0, macromol_dataframe 0.9.0, polars 1.17.1, duckdb 1.5.6,
gemmi 0.7.5, numpy 2.4.6).

The zones of the result (24: 3fy3 10 in 'test', 1ypi 13 in 'train', 1qjg 1 in 'val',
each on assembly 1) are what tests/test_from_macromol_gym.py expects.
"""
import sys
import time
import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import macromol_census as mmc
import macromol_gym as mmg
import macromol_gym.pick as mmg_pick
from macromol_census.find_identical_ligands import find_identical_ligands

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / 'mmcif'  # the repository's sample mmCIFs

# One file per PDB id: the census keys structures by `data_` block name, so
# 1qjg_clean.cif / 1qjg_mnt.cif (hand-edited copies of 1qjg, no assembly
# records) would collide with 1qjg.cif.gz.  Kept small on purpose: the stored
# atoms of every accepted assembly dominate the file size.
ENTRIES = ['171l', '1aa5', '1c58', '1qjg', '1ypi', '3fy3']

CONFIG = mmg.Config(
        census_md5='none (in-memory census built by make_fixture_db.py)',

        zone_size_A=10,

        density_check_radius_A=15,
        density_check_voxel_size_A=2,
        density_check_min_atoms_nm3=35,
        density_check_max_atoms_nm3=70,

        subchain_check_radius_A=8,
        subchain_check_fraction_of_zone=0.75,
        subchain_check_fraction_of_subchain=0.75,
        subchain_pair_check_fraction_of_zone=0.25,
        subchain_pair_check_fraction_of_subchain=0.75,

        neighbor_geometry='icosahedron and dodecahedron faces',
        neighbor_distance_A=30,
        neighbor_count_threshold=1,

        # Their test uses ['C','N','O','S','P'], which rejects every assembly
        # that has any other element (1aa5: CL, 1gzx: FE, 3v4i: MG).
        allowed_elements=['C', 'N', 'O', 'S', 'P', 'SE', 'CL'],
        # Their test of 1c58 uses ['GLC'] (amylose is all glucose, so 1c58
        # then has no dense zones); we leave it empty so 1c58 stays in.
        nonbiological_residues=[],

        atom_inclusion_radius_A=75,       # = their test
        atom_inclusion_boundary_depth_A=3,

        cath_md5={},
        cath_min_domains=7000,
)

SPLIT_TARGETS = {'train': 0.6, 'val': 0.2, 'test': 0.2}


def cif_path(pdb_id):
    return DATA / f'{pdb_id}.cif.gz'


def build_census(paths):
    census = mmc.open_db(':memory:')
    mmc.init_db(census)
    mmc.ingest_structures(census, paths)
    mmc.update_structure_ranks(census, mmc.rank_structures(census))
    mmc.insert_assembly_ranks(census, mmc.rank_assemblies(census))
    mmc.insert_entity_clusters(census, find_identical_ligands(census), 'identical-ligands')

    polymers = census.sql('''
            SELECT entity_id, sequence FROM entity_polymer ORDER BY entity_id
    ''').pl()
    seq_clusters = polymers.select(
            'entity_id',
            cluster_id=pl.col('sequence').map_elements(
                lambda s: hashlib.sha1(s.encode()).hexdigest()[:16],
                return_dtype=pl.String,
            ),
    )
    mmc.insert_entity_clusters(census, seq_clusters, 'identical-sequences')
    return census


def structure_clusters(census):
    """pdb_id -> cluster, as mmg_split_training_examples expects (CSV pdb_id,cluster)."""
    return census.sql('''
            SELECT DISTINCT structure.pdb_id AS pdb_id, cluster.name AS cluster
            FROM entity_cluster
            JOIN cluster ON cluster.id = entity_cluster.cluster_id
            JOIN entity ON entity.id = entity_cluster.entity_id
            JOIN structure ON structure.id = entity.struct_id
            WHERE cluster.namespace = 'identical-sequences'
            ORDER BY pdb_id, cluster
    ''').pl()


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / 'mmgym_fixture.sqlite'
    t0 = time.perf_counter()

    if out.exists():
        out.unlink()

    census = build_census([cif_path(x) for x in ENTRIES])
    t_census = time.perf_counter()

    db = mmg.open_db(str(out), mode='rwc')
    with db:
        mmg.init_db(db)
        mmg_pick._insert_config(db, CONFIG)
    polymer_labels = mmg.pick_polymer_labels(db)
    no_cath = pl.DataFrame(
            [], {'pdb_id': str, 'chain_id': str, 'domain_id': int,
                 'seq_ids': pl.List(int), 'c': int, 'a': int, 't': int, 'h': int},
    )
    cath_labels = mmg.pick_cath_labels(db, no_cath, CONFIG.cath_min_domains)
    db.commit()

    mmg.pick_training_zones(
            db, census,
            config=CONFIG,
            polymer_labels=polymer_labels,
            cath_labels=cath_labels,
            get_mmcif_path=cif_path,
    )
    t_pick = time.perf_counter()

    struct_zone_counts = mmg.select_struct_zone_counts(db)
    clusters = structure_clusters(census).filter(
            pl.col('pdb_id').is_in(list(struct_zone_counts))
    )
    # Deterministic: the first seed whose random split leaves no split empty.
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        splits = mmg.make_splits(rng, struct_zone_counts, clusters, SPLIT_TARGETS)
        if set(splits.values()) == set(SPLIT_TARGETS):
            break
    with db:
        mmg.update_splits(db, splits)
        mmg.upsert_metadata(db, {'split_random_seed': seed, 'split_targets': SPLIT_TARGETS})
    mmg.summarize_splits(struct_zone_counts, SPLIT_TARGETS, splits)

    # Smaller pages only to keep the fixture small (16 tables/indices = 16
    # pages minimum); the schema is untouched.
    db.execute('PRAGMA page_size = 1024')
    db.execute('VACUUM')
    db.close()
    t_end = time.perf_counter()

    print(f'\nwrote {out} ({out.stat().st_size:,} bytes)')
    print(f'time: census {t_census - t0:.1f} s, pick {t_pick - t_census:.1f} s, '
          f'total {t_end - t0:.1f} s')


if __name__ == '__main__':
    main()
