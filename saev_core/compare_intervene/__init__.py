"""The best PCA direction's intervention beside the best SAE feature's (issue 15.5).

The baselines step (`saev_core.baselines`) asks whether an SAE *detects* concepts that simpler
bases of the same activations do not. This module asks the causal half: does editing along the
best PCA direction move the classifier as much as editing the best SAE feature? On a backbone
with a classifier head (the supervised demo ViT, whose head reads the concepts), for each concept
the head predicts, on the report split's images that carry the concept (test, never the select
split where both units were chosen), at each strength `s` (default the demo's intervene sweep
0, -2, -5), every token at the SAE's layer is edited in one of three ways:

- `sae`: the concept's best SAE feature (the baselines table's `sae` row: best image-level AUROC
  on the select split, the same rule that picks the PCA component) is clamped to
  `s x max_act` (its max observed activation, stats `features.parquet`), as the demo's intervene
  stage does: `x' = x + (s max_act - f(x)) W_dec[f] / norm_scale`, the SAE's error term kept.
- `pca`: with `u` the best PCA component for the concept, oriented by its `sign` (unit norm;
  baselines `direction`), `mu` the PCA's mean and `p(x) = (x - mu) . u` the centred projection
  the baselines stage scored, the unit's value is `relu(p(x))` and is clamped to `s x M`:
  `x' = x + (s M - relu(p(x))) u`, everything orthogonal to `u` left as it was. The ReLU makes
  the clamp mean what the SAE's does at every `s`: an SAE feature is >= 0, so clamping it to 0
  removes only its positive activation and leaves a token where it is silent untouched; clamping
  the signed projection to 0 would instead be mean-ablation along `u` of every token, pushing
  the tokens with a negative projection *up* the concept's direction. So at `s = 0` only tokens
  with `p > 0` move (to `p = 0`), and at `s < 0` a token with `p <= 0` moves by `s M` (to
  `p + s M`), as a silent SAE feature set to `s max_act` adds `s max_act` decoder rows. `M` is
  the largest centred projection over the tokens and splits the stats run took `max_act` over
  (its `run.parquet` records both), so both doses are the same multiple of each unit's largest
  observed value; `mu` is the mean of the PCA's own fit sample, drawn again with the baselines'
  `n_fit` and `seed` (the table's metadata), i.e. `PCA.mean_`.
- `random`: each method's edit with its change of every token replaced by a random unit vector
  of the same norm (`n_random` seeded directions, the same ones for both methods; `control_for`
  says which method's norms they carry): moving the residual stream as far, in no particular
  direction.

Measured per image: the change of the concept's logit (`delta`) and the mean change of the other
concepts' logits (`other_delta`; `other_abs_delta` its mean absolute value: specificity); each
row has the mean over images with a percentile bootstrap 95% interval (`lo`, `hi`; random rows:
the per-image mean over the directions). The bootstrap draws and sign flips are shared by every
row of a concept, so all differences below are paired over the same images.

The two arms are not dose-matched: each clamps to `s` times its own max, and a PCA direction
(edited on every token, with a max set by outliers) can move x orders of magnitude further than
a sparse SAE feature. So the headline is not pca - sae but the *control-adjusted* paired
difference per image, `adj = (pca - random_pca) - (sae - random_sae)`: each arm's effect beyond
a random direction moved exactly as far on every token (each control norm-matched to its own
arm). On the arm rows, `adj_delta` (`adj_lo`, `adj_hi`) is the arm's `delta` minus its
control's, per image; on the `pca` rows, `adj_diff` (`adj_diff_lo`, `adj_diff_hi`) is the mean
of `adj` with its paired bootstrap CI and `adj_diff_p` its two-sided paired sign-flip p-value
(`verdicts.sign_flip_pvalue`), Holm-adjusted over every concept x strength of the run as
`p_adjusted` (`verdicts.adjust`, as the demo's intervene verdicts are). `raw_diff`
(`raw_diff_lo`, `raw_diff_hi`, `raw_diff_p`) keeps the unadjusted pca - sae, which mixes the
direction's effect with its dose. `stronger` (the summary, the query) reads the adjusted
difference: the arm whose adjusted effect goes further the way the clamp pushes, when its CI
excludes 0 *and* `p_adjusted < alpha` (0.05), else `level`.

The dose: `dx_norm` is the mean |dx| over the tokens the edit changed (`n_tokens_edited` of
them: at `s = 0` only those where the unit is positive), `dx_norm_all` the mean |dx| over all
`n_tokens` tokens of the edited images (unchanged ones count 0): the two arms' sizes compare on
the latter. `delta_per_dx` and `adj_delta_per_dx` are `delta` and `adj_delta` per unit of
`dx_norm_all`: the effect per unit of perturbation. `out_dir/pca_vs_sae.parquet` holds the rows
(written atomically, NaN written as null); `pca_vs_sae` returns a small summary for the DVC
metrics file that says plainly, per strength, on which concepts the SAE's edit does not move its
concept more than the PCA direction's.

Before anything runs, the baselines table must have been computed with this SAE (`sae_dir`):
its metadata's SAE path (or its weights' sha256, when recorded) and its `sae` rows' unit
directions, which must be the SAE's own decoder rows (`check_baselines_sae`).

The edits go through `saev_core.intervene` unchanged: a PCA direction is wrapped as a one-unit
dictionary (`ProjectionUnit`: encode = relu of the centred projection, decoder row = `u`), so
clamping it is a `FeatureEdit` clamp, and every edit runs with its random-direction controls
stacked in one forward pass (`stacked_splice`).

Shape suffixes: `n` images, `c` the head's labels, `d` d_model, `k` random directions.

The package, by submodule:

- `units`: the columns, `PcaVsSaeConfig`, `ProjectionUnit`, the logit reader and the
  measurement of one concept (`edited_logits`, `compare_concept`, `adjust_pairs`, `stronger`).
- `inputs`: what the stage reads and checks first: the baselines' metadata and SAE
  (`check_baselines_sae`), the stats' tokens and splits, the PCA direction's mean and max.
- `run`: the stage (`pca_vs_sae`), its Parquet (`write_pca_vs_sae`) and its summary.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.compare_intervene)
from .inputs import (
    baselines_meta,
    check_baselines_sae,
    max_projections,
    pca_mean,
    stats_tokens_and_splits,
)
from .run import pca_vs_sae, summary, write_pca_vs_sae
from .units import (
    COLUMNS,
    INTEGERS,
    METHODS,
    STRINGS,
    Arm,
    PcaVsSaeConfig,
    ProjectionUnit,
    adjust_pairs,
    compare_concept,
    dose,
    edited_logits,
    load_logit_reader,
    logit_reader,
    logits,
    stronger,
)
