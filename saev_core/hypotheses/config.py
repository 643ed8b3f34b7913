"""What a run of hypotheses is given: the `intervene` params section and the hypotheses.

`InterveneConfig` is the params.yaml section `intervene` (the defaults of every hypothesis, the
batch, hand-written hypotheses and how they are measured); `Hypothesis` is one experiment (SAE,
features, edit and strengths, scope, task, target, evaluation images); `Settings` says how every
hypothesis of a run is measured (controls, bootstrap, permutations, correction, batch sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saev_core.intervene.splicing import EDIT_OPS
from saev_core.verdicts import ALTERNATIVES, CORRECTIONS

# ---------------------------------------------------------------------------------------------
# the stage's configuration


@dataclass(frozen=True)
class InterveneConfig:
    """params.yaml section `intervene`: the hypotheses to test and how to measure them.

    The fields from `model` to `max_images` are the defaults of every hypothesis (the fields of
    `hypotheses.Hypothesis` of the same name); `batch` adds one hypothesis per label (its best
    feature), `hypotheses` and `hypotheses_file` add hand-written ones.
    """

    model: str = "artifacts/backbone"
    """The classifier (task classifier), or the backbone the probe reads (task probe)."""
    sae_dir: str = "artifacts/saes/demo"
    """The SAE to splice in, at the layer recorded in its cfg.json."""
    stats_dir: str = "artifacts/stats/demo"
    """Its per-feature stats (best feature by AUROC, max activation, frequency)."""
    warehouse: str = ""
    """Resolve best features through this DuckDB file (read-only) instead of the stats Parquet."""
    data: str = "data/shapes"
    """Image source of the evaluation images."""
    split: str = "test"
    """Held-out split the experiments run on (not the stats' select split, where the features
    were chosen: that is refused unless a hypothesis sets allow_selection_split)."""
    out_dir: str = "artifacts/interventions/demo"
    """Where results.parquet goes; its name is the run's name."""
    task: Literal["classifier", "probe"] = "classifier"
    """What reads the model: the classifier's head or a probe."""
    probe_dir: str = ""
    """For task probe: a probe directory (`saev probe`)."""
    op: Literal["suppress", "clamp", "scale", "add"] = "clamp"
    """The edit."""
    relative: bool = True
    """clamp/add values are multiples of the feature's max observed activation."""
    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Dose-response: the edit's values (clamp at 0 suppresses; the paper used -2 x max)."""
    scope: Literal["all", "patches", "cls", "region", "target"] = "all"
    """Which tokens the edit touches (target: the target label's pixels, from the masks)."""
    n_features: int = 1
    """How many of a label's best features (by `select_by` AUROC) are edited together."""
    select_by: Literal["patch", "image"] = "patch"
    """Rank a label's features by patch-level AUROC (where it fires) or image-level AUROC (an
    image's highest patch: what an image classifier can read)."""
    max_images: int = 1000
    """At most this many evaluation images per hypothesis."""
    batch: bool = True
    """Test the best feature of every label in `concepts` (one hypothesis each)."""
    concepts: tuple[str, ...] = ()
    """Labels of the batch; empty = every label the classifier/probe predicts."""
    hypotheses: tuple[dict[str, Any], ...] = ()
    """More hypotheses, each a dict of `Hypothesis` fields over the defaults above."""
    hypotheses_file: str = ""
    """A YAML file with a list of such dicts (or {hypotheses: [...]})."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction of the effect on the target (auto: decrease for suppress, clamp <= 0,
    scale < 1; increase for add > 0, clamp > 0, scale > 1); a hypothesis may set its own."""
    controls: tuple[str, ...] = ("random_feature", "random_direction", "no_edit")
    """Controls run next to every edit."""
    n_control_features: int = 10
    """Random features matched in frequency, per hypothesis and strength."""
    n_control_directions: int = 10
    """Random residual-stream directions matched in norm, per hypothesis and strength."""
    n_candidates: int = 32
    """Random-feature controls come from this many alive features nearest in frequency."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity correction over every hypothesis x strength of the run: holm (family-wise
    error) or bh (Benjamini-Hochberg, false discovery rate)."""
    alpha: float = 0.05
    """Verdict 'supported' when the adjusted p-value is below alpha, the effect points the
    tested way and lies beyond the controls' 95% range (`verdicts.beyond_controls`)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the 95% intervals."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test."""
    batch_size: int = 128
    """Images per forward pass."""
    stack_rows: int = 1024
    """Images x conditions per forward pass after the SAE layer (edit and controls stacked)."""
    n_grid: int = 8
    """Images shown in the before/after grid of each experiment (0: none)."""
    seed: int = 0
    """Seed for control features, random directions, bootstrap and permutations."""

    def __post_init__(self) -> None:
        if not self.strengths:
            raise ValueError("intervene.strengths: give at least one strength")
        if self.scope not in ("all", "patches", "cls", "region", "target"):
            raise ValueError(
                f"intervene.scope must be all|patches|cls|region|target, got {self.scope!r}"
            )
        if self.op not in EDIT_OPS:
            raise ValueError(f"intervene.op must be one of {'|'.join(EDIT_OPS)}, got {self.op!r}")
        if self.n_features < 1:
            raise ValueError("intervene.n_features must be >= 1")
        if self.select_by not in ("patch", "image"):
            raise ValueError(f"intervene.select_by must be patch|image, got {self.select_by!r}")
        if self.correction not in ("holm", "bh"):
            raise ValueError(f"intervene.correction must be holm|bh, got {self.correction!r}")
        if self.alternative not in ("auto", "less", "greater", "two-sided"):
            raise ValueError(
                f"intervene.alternative must be auto|less|greater|two-sided, got {self.alternative!r}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError(f"intervene.alpha must be in (0, 1), got {self.alpha}")
        if self.n_control_features < 0 or self.n_control_directions < 0:
            raise ValueError("intervene.n_control_features/n_control_directions must be >= 0")
        if not self.batch and not self.hypotheses and not self.hypotheses_file:
            raise ValueError("intervene: nothing to test (batch is false and no hypotheses)")

    DEFAULT_FIELDS = (
        "model", "sae_dir", "stats_dir", "warehouse", "data", "split", "task", "probe_dir",
        "op", "relative", "strengths", "scope", "n_features", "select_by", "max_images",
    )  # fmt: skip

    def defaults(self) -> dict[str, Any]:
        """The hypothesis fields every hypothesis of this run starts from."""
        return {k: getattr(self, k) for k in self.DEFAULT_FIELDS}

    def settings(self, device: str = "cpu") -> Any:
        """How experiments are measured (`hypotheses.Settings`)."""
        return Settings(
            controls=self.controls,
            n_control_features=self.n_control_features,
            n_control_directions=self.n_control_directions,
            n_bootstrap=self.n_bootstrap,
            n_permutations=self.n_permutations,
            alternative=self.alternative,
            correction=self.correction,
            alpha=self.alpha,
            batch_size=self.batch_size,
            stack_rows=self.stack_rows,
            n_grid=self.n_grid,
            n_candidates=self.n_candidates,
            seed=self.seed,
            device=device,
        )

    def extra_hypotheses(self) -> list[Any]:
        """The hand-written hypotheses (params list, then the YAML file), defaults filled in."""
        from saev_core.config import from_dict

        items = list(self.hypotheses)
        if self.hypotheses_file:
            import yaml

            path = Path(self.hypotheses_file)
            if not path.is_file():
                raise FileNotFoundError(f"intervene.hypotheses_file not found: {path}")
            loaded = yaml.safe_load(path.read_text()) or []
            loaded = loaded.get("hypotheses", []) if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, list):
                raise ValueError(f"{path}: expected a list of hypotheses")
            items += loaded
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"intervene hypothesis {i}: expected a mapping, got {item!r}")
            out.append(from_dict(Hypothesis, {**self.defaults(), **item}, f"hypothesis {i}"))
        return out


CONDITIONS = {"edit": "", "random_feature": "control_", "random_direction": "direction_"}


HYPOTHESIS_SCOPES = ("all", "patches", "cls", "region", "target")


@dataclass(frozen=True)
class Hypothesis:
    """Editing `features` of the SAE at its layer changes the prediction of `target`."""

    target: str
    """The label (classifier/probe class) whose prediction the edit should change."""
    name: str = ""
    """Name of the experiment (default: target, features and edit)."""
    sae_dir: str = "artifacts/saes/demo"
    """The SAE; it is spliced at the layer in its cfg.json unless `layer` says otherwise."""
    stats_dir: str = "artifacts/stats/demo"
    """Its per-feature stats: max activation (dose), frequency (controls), label AUROC."""
    warehouse: str = ""
    """DuckDB file to resolve the best feature in (read-only); empty = the stats Parquet."""
    features: tuple[int, ...] = ()
    """Feature ids to edit; empty = the `n_features` best for `best_for` (default: target)."""
    best_for: str = ""
    """Label whose best features (by `select_by` AUROC) are edited when `features` is empty."""
    n_features: int = 1
    """How many best features to edit together."""
    select_by: Literal["patch", "image"] = "patch"
    """Rank features for `best_for` by patch-level or image-level AUROC."""
    layer: int | None = None
    """Block to splice at; None = the layer the SAE was trained on."""
    op: Literal["suppress", "clamp", "scale", "add"] = "clamp"
    """The edit (see `intervene.FeatureEdit`)."""
    relative: bool = True
    """clamp/add values are multiples of each feature's max observed activation."""
    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Dose-response sweep: the edit's value at each step (suppress ignores it)."""
    scope: Literal["all", "patches", "cls", "region", "target"] = "all"
    """Tokens edited: all, patches, CLS, a `bbox` region, or the target's own pixels (masks)."""
    bbox: tuple[float, ...] = ()
    """For scope region: (x0, y0, x1, y1) in px of each original image."""
    task: Literal["classifier", "probe"] = "classifier"
    """What reads the model: the classifier's head, or a probe (`probe_dir`)."""
    model: str = "artifacts/backbone"
    """The classifier directory, or the backbone the probe was trained on."""
    probe_dir: str = ""
    """For task probe: a directory written by `probes.train_probes`."""
    data: str = "data/shapes"
    """Evaluation images (`load_records` source)."""
    split: str = "test"
    """Their split."""
    val_fraction: float = 0.1
    """A source without its own val split: the share held out as val (the extract stage's
    `val_fraction`, so that these images are split as the shards were)."""
    images: Literal["with_target", "all"] = "with_target"
    """Evaluate on the images labelled with the target, or on all of them."""
    max_images: int = 500
    """At most this many evaluation images."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction of the effect on the target; auto: the run's `Settings.alternative`,
    and if that is auto too, by the edit (`verdicts.resolve_alternative`)."""
    allow_selection_split: bool = False
    """Allow evaluating on the split the features were chosen on (the row's `held_out` is then
    False); by default that is refused, since the effect would not be held out."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("a hypothesis needs a target label")
        if self.op not in ("suppress", "clamp", "scale", "add"):
            raise ValueError(f"op must be suppress|clamp|scale|add, got {self.op!r}")
        if self.scope not in HYPOTHESIS_SCOPES:
            raise ValueError(f"scope must be one of {'|'.join(HYPOTHESIS_SCOPES)}")
        if self.scope == "region" and len(self.bbox) != 4:
            raise ValueError("scope region needs bbox: [x0, y0, x1, y1] in image px")
        if self.task not in ("classifier", "probe"):
            raise ValueError(f"task must be classifier or probe, got {self.task!r}")
        if self.task == "probe" and not self.probe_dir:
            raise ValueError("task probe needs probe_dir")
        if self.images not in ("with_target", "all"):
            raise ValueError(f"images must be with_target or all, got {self.images!r}")
        if not self.strengths:
            raise ValueError("strengths: give at least one")
        if self.select_by not in ("patch", "image"):
            raise ValueError(f"select_by must be patch or image, got {self.select_by!r}")
        if self.n_features < 1 or self.max_images < 1:
            raise ValueError("n_features and max_images must be >= 1")
        if self.alternative not in ALTERNATIVES:
            raise ValueError(f"alternative must be one of {'|'.join(ALTERNATIVES)}")

    @property
    def title(self) -> str:
        return self.name or f"{self.target}:{self.op}"


@dataclass(frozen=True)
class Settings:
    """How experiments are measured (shared by every hypothesis of a run)."""

    controls: tuple[str, ...] = ("random_feature", "random_direction", "no_edit")
    """Controls to run besides the edit."""
    n_control_features: int = 10
    """Random-feature controls per hypothesis and strength (each matched in frequency)."""
    n_control_directions: int = 10
    """Random-direction controls per hypothesis and strength (each matched in norm)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the 95% intervals (one index matrix per hypothesis, shared by
    every condition and strength: all intervals are paired over images)."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test (exact when 2^n_images is no more)."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction for hypotheses that leave theirs on auto (auto: by the edit)."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity correction over every hypothesis x strength of a run (Holm: family-wise
    error; bh: Benjamini-Hochberg false discovery rate)."""
    alpha: float = 0.05
    """A verdict is 'supported' when the adjusted p-value is below this (and the edit is beyond
    the controls' 95% range the tested way: `verdicts.verdict`)."""
    batch_size: int = 128
    """Images per forward pass."""
    stack_rows: int = 1024
    """Rows (images x conditions) per forward pass after the SAE layer, where the edit and its
    controls are stacked along the batch (`intervene.stacked_splice`)."""
    n_grid: int = 8
    """Images in each before/after grid (0: no figures)."""
    n_candidates: int = 32
    """Random-feature controls are drawn from this many alive features nearest in frequency."""
    seed: int = 0
    """Seed for control features, directions, bootstrap and permutations."""
    device: str = "cpu"
    """Where models run."""

    def __post_init__(self) -> None:
        bad = [
            c for c in self.controls if c not in ("random_feature", "random_direction", "no_edit")
        ]
        if bad:
            raise ValueError(f"unknown controls {bad}: use random_feature|random_direction|no_edit")
        if self.n_bootstrap < 10 or self.batch_size < 1 or self.n_candidates < 1:
            raise ValueError("n_bootstrap >= 10, batch_size >= 1 and n_candidates >= 1 needed")
        if self.n_control_features < 0 or self.n_control_directions < 0:
            raise ValueError("n_control_features and n_control_directions must be >= 0")
        if self.n_permutations < 100 or self.stack_rows < 1:
            raise ValueError("n_permutations >= 100 and stack_rows >= 1 needed")
        if self.alternative not in ALTERNATIVES:
            raise ValueError(f"alternative must be one of {'|'.join(ALTERNATIVES)}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {'|'.join(CORRECTIONS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
