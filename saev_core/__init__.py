"""saev_core: SAEs on vision transformers, as a library (no Prefect, DVC or MLflow in here).

The names a notebook needs, imported lazily so that `import saev_core` (and the `saev` CLI)
starts fast:

    from saev_core import SAE, load_backbone, iter_ordered, iter_shuffled, splice, Splice
"""

from importlib import import_module

_EXPORTS = {
    "SAE": "saev_core.sae",
    "SAEConfig": "saev_core.sae",
    "TrainConfig": "saev_core.training",
    "train_sae": "saev_core.training",
    "train_saes": "saev_core.training",
    "load_saev": "saev_core.sae_io",
    "load_saelens": "saev_core.sae_io",
    "save_saelens": "saev_core.sae_io",
    "evaluate": "saev_core.training",
    "load_backbone": "saev_core.backbone",
    "record_blocks": "saev_core.backbone",
    "read_manifest": "saev_core.shards",
    "iter_ordered": "saev_core.loaders",
    "iter_shuffled": "saev_core.loaders",
    "iter_images": "saev_core.loaders",
    "iter_image_batches": "saev_core.loaders",
    "ExtractConfig": "saev_core.extract",
    "extract": "saev_core.extract",
    "load_records": "saev_core.data",
    "open_image": "saev_core.data",
    "compute_stats": "saev_core.stats",
    "splice": "saev_core.intervene",
    "Splice": "saev_core.intervene",
    "FeatureEdit": "saev_core.intervene",
    "Hypothesis": "saev_core.hypotheses",
    "run_hypothesis": "saev_core.hypotheses",
    "load_probe": "saev_core.probes",
    "run_query": "saev_core.warehouse",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saev_core' has no attribute {name!r}")
