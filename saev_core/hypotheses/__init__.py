"""Hypotheses about SAE features as data, tested by editing the features inside the model.

A `Hypothesis` names the SAE, the feature(s) (ids, or the best feature for a label from the
stats Parquet or the warehouse, chosen on the stats' select split), the edit and its strengths
(a dose-response sweep), the scope, the task that reads the model (the demo classifier, or a
linear probe from `probes.py`), the target label and the evaluation images (by default the test
split; evaluating on the split the features were chosen on is refused unless
`allow_selection_split`; each row records `select_split`, `eval_split` and `held_out`).

- `config`: the `intervene` params section (`InterveneConfig`), `Hypothesis`, `Settings`.
- `readers`: what reads the model (`Reader`, `load_reader`), evaluation images and `Cache`.
- `selection`: best features and frequency-matched controls (`best_features`,
  `frequency_matched`), `stats_run`, `provenance`, `batch_hypotheses`.
- `measure`: the metrics of an edit and its controls against the unedited predictions.
- `figures`: before/after grids and `dose_response_figure`.
- `run`: `run_hypothesis` (what it measures is in that module's docstring), `Result`, `plan`,
  `run_all`, `write_results`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.hypotheses)

from .config import Hypothesis, InterveneConfig, Settings
from .figures import dose_response_figure
from .readers import Cache, Reader, load_reader
from .run import Result, plan, run_all, run_hypothesis, write_results
from .selection import batch_hypotheses, best_features, frequency_matched, provenance, stats_run
