"""The extract stage: run a backbone over images and record the residual stream as shards.

For each image batch the backbone runs once with forward hooks on the chosen blocks; the tokens
the policy selects (CLS, registers, patches) go to Parquet shards, one file per layer per chunk
of `images_per_file` images.

Safety, in the order a run meets it:
- **Refuse to mix.** An existing shard set made with another model, weights, layers, token
  policy, dtype, preprocessing or source is never appended to (`overwrite` replaces it instead).
- **Incremental.** If the shard set exists and matches, only images it does not hold yet (by
  their stable source key) are extracted; the manifest records what was added.
- **Resumable.** Work happens in a staging directory `.<name>.partial` next to `out_dir`. A
  chunk counts as done only once its files are renamed into place *and* its record
  `chunks/<chunk>.json` is written; a rerun after a crash (even `kill -9`) keeps done chunks,
  deletes anything else and extracts the rest with the same batches, so it ends with exactly
  the bytes an uninterrupted run writes.
- **Atomic publication.** The finished staging directory replaces `out_dir` by renames, so
  `out_dir` is always either absent, the previous complete set, or the new complete set.
- **Bad images** (corrupt, truncated, empty, not an image, huge) are skipped and listed with the
  reason in `skipped.json` and the manifest, or stop the run with `strict`. CMYK and 16-bit grey
  images are converted (`data.read_image`) and listed in `converted.json`, counted by kind in the
  manifest's `converted`; `strict` refuses them as bad images instead.
- **Held-out split.** A source without a val split gets one by a stable hash of the image keys
  (`extract.val_fraction`, see `saev_core.data`); the rule is part of the set's identity
  (`val_split` in the manifest), so a changed fraction is refused like any other change.

Nothing time- or machine-dependent is written into the shard set, so two extractions of the
same inputs give identical files and hashes.

- `config`: `ExtractConfig`, `ShardSetMismatch`, the staging names `PLAN`, `CHUNKS`, `SKIPPED`,
  `CONVERTED`.
- `plan`: the set's identity, `pending` (what a set lacks), the image order, the staging directory.
- `chunks`: `patch_majority`, one chunk's extraction and its tables.
- `publish`: the manifest from the chunk records and the atomic publication.
- `run`: `extract`, `plan_partitions`, `extract_partition`, `merge_partitions`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.extract)
from .chunks import patch_majority
from .config import CHUNKS, CONVERTED, PLAN, SKIPPED, ExtractConfig, ShardSetMismatch
from .plan import pending
from .run import extract, extract_partition, merge_partitions, plan_partitions
