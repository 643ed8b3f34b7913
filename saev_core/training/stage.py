"""The train stage over files: `TrainStage` (params.yaml section `train`) and `train_stage`.

`train_stage` checks the shard set (`check_shards`), trains the SAE and its sweep on one pass of
the shards, evaluates each on the held-out split and writes the checkpoints atomically. Tracking
reaches it as a `log(metrics, step)` callback; nothing here knows about Prefect, DVC or MLflow.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saev_core import shards
from saev_core.config import from_dict, to_dict
from saev_core.files import Log, no_log, replace_dir, tmp_dir_for
from saev_core.loaders import common as loader_common
from saev_core.loaders.ordered import iter_ordered
from saev_core.loaders.shuffled import iter_shuffled, sample_rows


@dataclass(frozen=True)
class TrainStage:
    """params.yaml section `train`: which shards to train on and where the SAE (and its sweep) go."""

    shard_dir: str = "artifacts/activations/shapes"
    """The (validated) shard set to train on."""
    layer: int = 2
    """Which recorded layer of the shard set."""
    tokens: Literal["all", "patches", "prefix"] = "all"
    """Train on every token, only patches (the paper), or only CLS/registers."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "val"
    """Held-out split for the final metrics (L0, FVU, dead, dense)."""
    out_dir: str = "artifacts/saes/demo"
    """Checkpoint directory (sae.safetensors + cfg.json); sweep members go to `<out_dir>/sweep/<name>/`."""
    sae: dict[str, Any] = field(default_factory=dict)
    """SAE hyperparameters: the fields of `training.TrainConfig`."""
    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More SAEs trained on the same pass of the data: `{name: overrides of sae}` (e.g. `{k8: {k: 8}}`).
    The key `distribute: true` among them sets `distribute_sweep` instead of naming a member."""
    distribute_sweep: bool = False
    """Each sweep member its own flow run on the GPU work pool (flows/distributed.py), each with
    its own pass of the data, instead of one pass here; members land in the same place."""
    checkpoint_dir: str = ""
    """Resumable training checkpoints ('' = `<out_dir>.ckpt`); a killed run resumes from it; removed on success."""
    register_as: str = ""
    """MLflow registered-model name for the best SAE of the run and its sweep ('' = none)."""
    register_max_l0: float = 32.0
    """The best SAE: lowest val FVU among those with L0 <= this and under 10% dead features."""

    def __post_init__(self) -> None:
        from saev_core.training.config import TrainConfig, sweep_configs

        if isinstance(self.sweep, dict) and "distribute" in self.sweep:
            flag = self.sweep["distribute"]
            if not isinstance(flag, bool):
                raise ValueError(f"train.sweep.distribute must be true or false, got {flag!r}")
            members = {k: v for k, v in self.sweep.items() if k != "distribute"}
            object.__setattr__(self, "sweep", members)
            object.__setattr__(self, "distribute_sweep", self.distribute_sweep or flag)
        for name in self.sweep:
            if not name or "/" in name or name.startswith(".") or name == "main":
                raise ValueError(f"train.sweep: bad member name {name!r}")
        # A typo in `sae` or a sweep member (params file or `-S sae.kk=...`) fails on loading,
        # naming the key and the valid ones, not when the stage starts.
        if not isinstance(self.sae, dict):
            raise ValueError(
                f"train.sae: expected a mapping of TrainConfig fields, got {self.sae!r}"
            )
        from_dict(TrainConfig, self.sae, where="train.sae")
        sweep_configs(self.sae, self.sweep)


def check_shards(io: TrainStage) -> Any:
    """The shard set's manifest, after checking what training needs, before any training.

    Refuses a missing layer, an empty split, files that are missing or whose row count or vector
    width disagree with the manifest, so a bad shard set fails in seconds with a clear message.
    """
    import pyarrow.parquet as pq

    m = shards.read_manifest(io.shard_dir)
    if io.layer not in m.layers:
        raise ValueError(f"train.layer {io.layer} not recorded in {io.shard_dir} (has {m.layers})")
    width = m.d_model * m.dtype.itemsize
    for split in (io.train_split, io.eval_split):
        files = m.files(io.layer, [split])
        if not files or sum(f["rows"] for f in files) == 0:
            raise ValueError(f"no rows of split {split!r}, layer {io.layer} in {io.shard_dir}")
        for f in files:
            path = m.dir / f["path"]
            if not path.is_file():
                raise FileNotFoundError(f"shard file {path} is listed in {m.path} but missing")
            meta = pq.read_metadata(path)
            if meta.num_rows != int(f["rows"]):
                raise ValueError(
                    f"shard file {path} has {meta.num_rows} rows, {m.path} says {f['rows']}"
                )
            act = meta.schema.to_arrow_schema().field("act").type
            got = (
                getattr(act, "byte_width", None) or getattr(act, "list_size", 0) * m.dtype.itemsize
            )
            if got != width:
                raise ValueError(
                    f"shard file {path}: vectors of {got} bytes, but the manifest says d_model "
                    f"{m.d_model} x {m.dtype} = {width} bytes"
                )
    return m


TRAIN_TIMING_KEYS = ("train_seconds", "tokens_per_s")
"""Keys of the training summary that measure time: returned under `metrics["timing"]`, never
written into the checkpoint, so the same training on the same machine writes the same bytes."""


def train_stage(
    io: TrainStage,
    log: Log = no_log,
    progress: bool = True,
    member_log: Callable[[str], Log] | None = None,
) -> dict[str, Any]:
    """Train the SAE (and any sweep members, on the same pass of the data) on a shard set.

    Returns the main SAE's held-out metrics (with per-feature `freq`, and the wall-clock
    `timing`, which the checkpoint does not hold) and, under `"sweep"`, `{name: metrics}` for
    each member. `member_log(name)` gives each member's log callback.
    """
    from saev_core.sae.checks import activation_space
    from saev_core.training.config import TrainConfig, check_shared, sweep_configs
    from saev_core.training.evaluation import evaluate
    from saev_core.training.loop import train_saes

    cfg = from_dict(TrainConfig, io.sae, where="train.sae")
    members = sweep_configs(io.sae, io.sweep) if io.sweep else {}
    names = ["main", *members]
    cfgs = [cfg, *members.values()]
    check_shared(cfgs, names)
    m = check_shards(io)
    for c in cfgs:
        c.sae_config(m.d_model)  # k > d_sae and the like fail now, not after reading data
    import torch

    def batches(epoch: int, split: str = io.train_split):
        # dtype=None: batches stay float16 (half the copy); the trainer casts on the device.
        for x in iter_shuffled(
            io.shard_dir,
            io.layer,
            cfg.batch_size,
            seed=cfg.seed + epoch,
            splits=[split],
            tokens=io.tokens,
            dtype=None,
        ):
            yield torch.from_numpy(x)

    per_image = (
        len(m.written_tokens)
        if io.tokens == "all"
        else sum((t >= m.n_prefix_tokens) == (io.tokens == "patches") for t in m.written_tokens)
    )
    n_rows = sum(f["images"] for f in m.files(io.layer, [io.train_split])) * per_image
    if n_rows == 0:
        raise ValueError(f"no {io.tokens} tokens of split {io.train_split!r} in {io.shard_dir}")
    n_steps = -(-n_rows // cfg.batch_size) * cfg.n_epochs
    out_dir = Path(io.out_dir)
    ckpt_dir = (
        Path(io.checkpoint_dir) if io.checkpoint_dir else out_dir.parent / f"{out_dir.name}.ckpt"
    )
    logs = [log] + [member_log(n) if member_log else no_log for n in members]
    # What the batches are: a checkpoint of another layer, token policy, split or shard set
    # (manifest hash) starts over instead of resuming (paths, log_every, device do not count).
    data = {
        "manifest_sha256": m.sha256,
        "layer": io.layer,
        "tokens": io.tokens,
        "split": io.train_split,
        # resuming skips the batches trained on by their place in the loader's order
        "shuffle_order": loader_common.SHUFFLE_ORDER,
    }
    results = train_saes(
        batches,
        m.d_model,
        cfgs,
        logs,
        progress=progress,
        n_steps=n_steps,
        checkpoint_dir=ckpt_dir,
        data=data,
        # normalisation and b_dec from rows drawn across the whole train split
        norm_sample=lambda n: torch.from_numpy(
            sample_rows(io.shard_dir, io.layer, n, cfg.seed, [io.train_split], io.tokens, "float32")
        ),
    )

    def eval_batches():
        for _, _, x in iter_ordered(
            io.shard_dir, io.layer, splits=[io.eval_split], tokens=io.tokens
        ):
            yield torch.from_numpy(x)

    tmp = tmp_dir_for(out_dir)
    all_metrics = {}
    for name, c, (sae, summary) in zip(names, cfgs, results, strict=True):
        sae = sae.cpu()
        metrics = evaluate(sae, eval_batches(), dense_threshold=c.dense_threshold)
        # wall-clock figures go to the caller (MLflow), not into the DVC-tracked cfg.json
        metrics["timing"] = {k: summary[k] for k in TRAIN_TIMING_KEYS if k in summary}
        summary = {k: v for k, v in summary.items() if k not in TRAIN_TIMING_KEYS}
        extra = {
            "shard_dir": str(io.shard_dir),
            "manifest_sha256": m.sha256,
            "backbone": m.data["model"]["name"],
            "backbone_sha256": m.data["model"]["weights_sha256"],
            "activation_space": activation_space(m.data),
            "layer": io.layer,
            "tokens": io.tokens,
            "train": to_dict(c),
            "metrics": scalars(metrics),
            "summary": summary,
        }
        sae.save(tmp if name == "main" else tmp / "sweep" / name, extra=extra)
        all_metrics[name] = metrics
    replace_dir(tmp, out_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # the run finished; its checkpoint has served
    main = dict(all_metrics.pop("main"))
    main["sweep"] = all_metrics
    return main


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (per-feature arrays left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
