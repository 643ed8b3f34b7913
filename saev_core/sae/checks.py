"""Provenance: an SAE, the shards and model it is applied to, and the stats computed from it.

`check_sae_matches` (SAE vs shards), `check_sae_model` (SAE vs backbone), `check_stats_match`
(stats vs SAE), from what the SAE's cfg.json and the stats' run.parquet record
(`activation_space`, `sae_sha256`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def activation_space(manifest: dict[str, Any]) -> dict[str, Any]:
    """What two shard sets must share for one SAE to read both: the backbone's weights, the
    preprocessing, the width and the token layout. Not the images, the layers extracted or the
    token policy (stats may stream another image set than training did, and a refreshed shard set
    grows, so its manifest's sha256 changes while its activations stay the same kind)."""
    import hashlib

    tokens = manifest.get("tokens") or {}
    pre = manifest.get("preprocessing")
    return {
        "backbone_sha256": (manifest.get("model") or {}).get("weights_sha256"),
        "preprocessing_sha256": (
            hashlib.sha256(json.dumps(pre, sort_keys=True).encode()).hexdigest()
            if pre is not None
            else None
        ),
        "d_model": manifest.get("d_model"),
        "n_prefix_tokens": tokens.get("n_prefix_tokens"),
        "grid": tokens.get("grid"),
    }


def sae_sha256(sae_dir: str | Path) -> str:
    """sha256 of an SAE checkpoint's weights file: what stats record to name the SAE they read."""
    from saev_core.hashing import sha256_file_cached
    from saev_core.sae.config import WEIGHTS_NAME

    path = Path(sae_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"SAE weights not found: {path}")
    return sha256_file_cached(path)


def _sae_extra(sae_dir: str | Path) -> dict[str, Any]:
    from saev_core.sae.config import CFG_NAME

    path = Path(sae_dir) / CFG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"SAE config not found: {path}")
    return dict(json.loads(path.read_text()).get("extra") or {})


def check_sae_matches(sae_dir: str | Path, shard_dir: str | Path) -> str:
    """Refuse to apply the SAE in `sae_dir` to the shards in `shard_dir` when its cfg.json says it
    was trained on another backbone (weights sha256) or on activations of another kind (the
    recorded `activation_space` of its training manifest, when its manifest sha256 differs);
    the error names both values. Returns the SAE's `sae_sha256`. An SAE that records nothing
    (imported from another project) is not checked."""
    from saev_core import shards

    extra = _sae_extra(sae_dir)
    m = shards.read_manifest(shard_dir)
    given = activation_space(m.data)
    recorded = extra.get("backbone_sha256")
    if recorded and given["backbone_sha256"] and recorded != given["backbone_sha256"]:
        raise ValueError(
            f"SAE {sae_dir} was trained on backbone weights sha256 {recorded} "
            f"({extra.get('backbone')}), but shards {shard_dir} come from weights sha256 "
            f"{given['backbone_sha256']} ({m.data.get('model', {}).get('name')})"
        )
    layer = extra.get("layer")
    if layer is not None and int(layer) not in m.layers:
        raise ValueError(
            f"SAE {sae_dir} reads layer {layer}, but shards {shard_dir} hold layers {m.layers}"
        )
    space = extra.get("activation_space")
    if isinstance(space, dict) and extra.get("manifest_sha256") != m.sha256:
        for key, want in space.items():
            got = given.get(key)
            if want is not None and got is not None and want != got:
                raise ValueError(
                    f"SAE {sae_dir} was trained on shards with {key} {want} (manifest sha256 "
                    f"{extra.get('manifest_sha256')}), but shards {shard_dir} have {key} {got} "
                    f"(manifest sha256 {m.sha256})"
                )
    return sae_sha256(sae_dir)


def check_sae_model(sae_dir: str | Path, model: str) -> None:
    """Refuse to splice the SAE in `sae_dir` into `model` (a directory or cached hub id) when the
    backbone weights it was trained on differ from `model`'s; the error names both sha256s."""
    from saev_core.backbone.model import weights_sha256

    extra = _sae_extra(sae_dir)
    recorded = extra.get("backbone_sha256")
    if not recorded:
        return
    given = weights_sha256(model)
    if recorded != given:
        raise ValueError(
            f"SAE {sae_dir} was trained on backbone weights sha256 {recorded} "
            f"({extra.get('backbone')}), but model {model} has weights sha256 {given}"
        )


def check_stats_match(stats_dir: str | Path, sae_dir: str | Path) -> None:
    """Refuse the stats in `stats_dir` when they were computed from another SAE than `sae_dir`:
    the SAE weights sha256 that `run.parquet` records (its `cfg_json.sae_sha256`), else, for
    stats written before that was recorded, the SAE's shape and held-out metrics. Stats without a
    run.parquet record nothing and are not checked."""
    import pyarrow.parquet as pq

    path = Path(stats_dir) / "run.parquet"
    if not path.is_file():
        return
    run = pq.read_table(path).to_pylist()
    if len(run) != 1:
        raise ValueError(f"{path}: expected one row, found {len(run)}")
    row = run[0]
    try:
        cfg = json.loads(row.get("cfg_json") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: cfg_json is not JSON ({e})") from None
    recorded = cfg.get("sae_sha256") if isinstance(cfg, dict) else None
    if recorded:
        given = sae_sha256(sae_dir)
        if recorded != given:
            raise ValueError(
                f"stats {stats_dir} were computed from an SAE with weights sha256 {recorded} "
                f"({row.get('sae_dir')}), but the SAE {sae_dir} has weights sha256 {given}"
            )
        return
    from saev_core.sae.config import CFG_NAME

    meta = json.loads((Path(sae_dir) / CFG_NAME).read_text())
    cfg_sae = meta.get("sae") or {}
    metrics = (meta.get("extra") or {}).get("metrics") or {}
    theirs = {"d_sae": cfg_sae.get("d_sae"), "arch": cfg_sae.get("arch"), **metrics}
    for key in ("d_sae", "arch", "l0", "fvu"):
        a, b = row.get(key), theirs.get(key)
        both_nan = isinstance(a, float) and isinstance(b, float) and a != a and b != b
        if a is not None and b is not None and a != b and not both_nan:
            raise ValueError(
                f"stats {stats_dir} were computed from an SAE with {key} {a} "
                f"({row.get('sae_dir')}), but the SAE {sae_dir} has {key} {b}"
            )
