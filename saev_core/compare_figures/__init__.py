"""One figure per question of the backbone comparison (issue 15 point 7), from its warehouse.

`make_figures` opens `warehouse/compare.duckdb` read-only and runs each question's named query
the way `saev sql` runs it (`saev_core.warehouse.run_query`: sandboxed, parameters bound), then
draws one matplotlib figure (Agg) per question. A figure's title asks the question and gives the
answer its rows hold; 95% intervals, where the query has them, are error bars.

Each figure is named after its query (sql/queries/<name>.sql) and asks:
- `compare_backbones`: how well does the best SAE feature detect each concept in each form, per
  backbone, beside the best feature on labels shuffled across images?
- `cross_form_features`: does one feature detect a concept across its forms?
- `semantic_probe`: does each concept's best feature beat a random feature on image F1?
- `sae_vs_baselines`: do simpler bases of the same activations (neurons, PCA, ICA, ...) detect
  the concepts as well as the SAE?
- `seed_stability`: do SAEs trained with other seeds find the same features?
- `probe_by_form`: does a linear probe on the backbone read each concept in each form?
- `pca_vs_sae_intervention`: does an edit along the best PCA direction move the concept's logit
  like the SAE feature's?

The last two come from stages that may not have run yet (or a warehouse built before their
sources existed): when their query is missing, fails, or returns no rows the figure is skipped
with the reason printed and kept in the report, so the stage works as the pieces land. The
first five must work.

Outputs: `<out_dir>/<name>.png`, and `<plots_dir>/<name>.json` the figure's data for
`dvc plots`: the query's rows as `saev sql -f json` prints them, each with one more field,
`plot_label`, naming the row in a plot (DVC's bar templates need one distinct category per bar).
A skipped figure's older files are removed, so neither folder shows a stale answer.

Tracking reaches this module as a callback (`tracker(pngs, data_files, metrics, params)`,
called unless `log_mlflow` is false); `flows.compare.mlflow_tracker` is the one the stage passes:
MLflow experiment `compare`, run `figures` (the flows' tracking URI and provenance tags), the
PNGs and JSON as artifacts, the headline numbers of `headline_metrics` as metrics.

The package, by submodule:

- `figure_data`: the figures' names (`FIGURES`, `OPTIONAL`), `FiguresConfig`, the row helpers
  (`intervention_rows`, `paired_rows`, `plot_label`).
- `draw`: the `fig_*` functions, one per question, and `DRAW` (name -> function).
- `figures`: `make_figures` (run the queries, write the files, track) and `headline_metrics`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.compare_figures)
from .draw import DRAW
from .figure_data import (
    FIGURES,
    FORM_ORDER,
    INTERVENTION_METHODS,
    KIND_ORDER,
    OPTIONAL,
    FiguresConfig,
    intervention_rows,
    paired_rows,
    plot_label,
)
from .figures import Tracker, fetch, headline_metrics, make_figures
