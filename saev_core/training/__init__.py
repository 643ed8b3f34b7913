"""The train stage: fit the input normalisation, train one SAE or a sweep, evaluate, over files.

Data arrives as iterables of tensors `x_bd` [batch, d_model] (any float dtype; cast on the
device); the caller builds them (shard loader, shuffling) and passes `make_batches(epoch)`, so
nothing but `stage` reads files. A sweep (`train_saes`) trains many SAEs in lock-step on the same
batches, so the data is read once for all of them. Runs checkpoint every `checkpoint_every`
steps (weights, Adam state, step, dead-latent counters, loader position) and resume from the
last checkpoint: `make_batches(epoch)` must give the same batches for the same epoch (the shard
loader does, per seed), so resuming skips the batches of the epoch already trained on.
Tracking reaches this package only through `log(metrics, step)`.

- `config`: `TrainConfig` (params.yaml `train.sae`), `sweep_configs`, `check_shared`, `noop_log`.
- `schedule`: device and precision, `lr_at`, `sparsity_coeff_at`, `fit_normalisation`,
  `geometric_median`, `make_adam`.
- `state`: `_Member` and `_Running`, the per-SAE state the loop and the checkpoints share.
- `checkpoint`: resumable checkpoints (`checkpoint_fingerprint`, `why_not_resume`).
- `loop`: `train_saes` and `train_sae`, the training loop.
- `evaluation`: `evaluate` and `dense_fractions`, the held-out metrics.
- `stage`: `TrainStage` and `train_stage`, the stage over files.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.training)
from .checkpoint import (
    NOT_IN_FINGERPRINT,
    STATE_NAME,
    checkpoint_fingerprint,
    read_checkpoint_state,
    why_not_resume,
)
from .config import (
    SAE_FIELDS,
    SHARED_FIELDS,
    LogFn,
    TrainConfig,
    check_shared,
    noop_log,
    sweep_configs,
)
from .evaluation import DENSE_FACTOR, dense_fractions, evaluate
from .loop import train_sae, train_saes
from .schedule import (
    fit_normalisation,
    geometric_median,
    lr_at,
    make_adam,
    resolve_device,
    sparsity_coeff_at,
    take_tokens,
    use_bf16,
)
from .stage import TRAIN_TIMING_KEYS, TrainStage, check_shards, scalars, train_stage
