"""The stats stage: per-feature statistics of a trained SAE over a shard set, and their tables.

- `config`: `StatsConfig` (the `stats.options` of params.yaml), `Batches`, `LABEL_FIELDS`.
- `features`: `FeatureStats`, the statistics of one run.
- `compute`: `compute_stats` (the streamed pass), `decoder_neighbors`, `exemplar_heatmaps`.
- `accumulator`: `_Accumulator`, the running state of one pass; `labels`: label look-ups.
- `assoc`: label association (AUROC, best F1) with its proven bounds; `exact`: the exact route
  (`ExactBuffer`, `exact_level`); `refine`: the refinement passes (`Refiner`).
- `splits`: select / report splits, shuffled-label controls, merging the splits' stats.
- `tables`: `write_stats`, the Parquet tables the warehouse reads.
- `stage`: `StatsStage` and `stats_stage`, the stage over files.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.stats)
from .compute import compute_stats, decoder_neighbors, exemplar_heatmaps
from .config import LABEL_FIELDS, StatsConfig
from .features import FeatureStats
