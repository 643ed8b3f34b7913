"""The stages as plain library functions over files: shards in, checkpoints and tables out.

Each `*_stage` function is what a Prefect flow, a test or a notebook calls. It reads its inputs
from disk, calls the model code (`training`, `stats`, ...), and writes its outputs atomically.
Tracking reaches it as a `log(metrics, step)` callback; nothing here knows about Prefect, DVC or
MLflow.
"""

from __future__ import annotations

from saev_core.files import Log, no_log, replace_dir, tmp_dir_for  # noqa: F401  (re-exports)
from saev_core.stats.stage import (  # noqa: F401  (re-exports: the stats stage)
    StatsStage,
    manifest_has_cls,
    stats_stage,
    stats_tokens,
)
from saev_core.training.stage import (  # noqa: F401  (re-exports: the train stage)
    TRAIN_TIMING_KEYS,
    TrainStage,
    check_shards,
    scalars,
    train_stage,
)
