"""Concept detection by an SAE's features against baselines on the same activations (issue 15.5).

Does an SAE find concepts that simpler bases of the same activations do not? `fit_baselines`
fits, on a uniform sample of train patch tokens (`loaders.sample_rows`), the bases a reviewer
would ask for: the raw neurons (each `d_model` unit), PCA and ICA components (scikit-learn), NMF
on sign-split centred activations (`[relu(x - mean), relu(mean - x)]`, NMF needs x >= 0), and
seeded random directions; the SAE's own features are one more method. Directions without a sign
of their own (neurons, PCA, ICA, random) are scored both ways, as `sign` +1 and -1.

`score_baselines` streams the select and report splits image by image and scores each image by
its highest patch value of each unit, as `saev_core.stats` scores an SAE feature at image level;
the image labels are the shard set's `images.parquet` `labels` (what the stats stage uses), or,
where it has none, every label one of the image's patches carries. Per method and concept the
best unit by image-level AUROC on the select split (val) is reported on the report split (test),
with a percentile bootstrap CI over the report split's images. The draws are the same for every
method, so each method is compared with the SAE paired: per concept, the bootstrap distribution
of its AUROC minus the SAE's on the same draws gives `diff_lo`, `diff_hi` and a two-sided
bootstrap `diff_p`, and `headline` counts the concepts whose difference CI excludes 0. Random
directions default to d_sae/2 per sign beside an SAE (d_sae scored units, as many as the SAE
has: choosing the best of more units on val would flatter them); `n_units` records each
method's count. Each row also carries the unit's direction in activation space,
so that the intervene stage can edit along the best PCA direction beside the SAE feature
(`best_direction`, `read_direction`).

Shape suffixes: `n` tokens, `d` d_model, `m` components of a method, `u` scored units (m, or 2m
with both signs), `i` images, `l` labels, `b` bootstrap draws.

- `units`: `METHODS`, `BaselinesConfig`, `Units` and `fit_baselines` (the fitted bases).
- `scores`: `COLUMNS` (the table), `image_scores`, `image_labels_of`, `label_matrix`,
  `auroc_matrix`, `bootstrap_auroc`, `select_and_report`.
- `run`: `sae_vs_baselines`, `best_direction`, `write_baselines`, `read_baselines`, `headline`,
  `main` (`saev baselines`).
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.baselines)
from .run import best_direction, headline, read_baselines, sae_vs_baselines, write_baselines
from .scores import (
    COLUMNS,
    auroc_matrix,
    bootstrap_auroc,
    image_labels_of,
    image_scores,
    label_matrix,
    select_and_report,
)
from .units import METHODS, BaselinesConfig, Units, fit_baselines
