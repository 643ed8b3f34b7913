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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.stats import rankdata

from saev_core import loaders, shards

METHODS = ("neuron", "pca", "ica", "nmf", "random", "sae")

COLUMNS = (
    "method",
    "concept",
    "unit",
    "sign",
    "auroc_val",
    "auroc_test",
    "lo",
    "hi",
    "n_units",
    "diff_lo",
    "diff_hi",
    "diff_p",
    "n_test_images",
    "n_test_pos",
    "select_split",
    "report_split",
    "direction",
)


@dataclass(frozen=True)
class BaselinesConfig:
    """How the baselines are fitted and scored."""

    methods: tuple[str, ...] = METHODS
    """Methods to score, from neuron, pca, ica, nmf, random, sae ("sae" needs an SAE)."""
    n_fit: int = 50_000
    """Train patch tokens drawn uniformly without replacement to fit PCA, ICA and NMF."""
    n_components: int = 0
    """Components of PCA, ICA and NMF (0: d_model, a full basis for PCA and ICA)."""
    n_random: int = 0
    """Random unit directions, each scored with both signs (0: d_sae // 2 beside an SAE, so both
    signs give as many units as the SAE has; else d_model)."""
    seed: int = 0
    """Seed of the fit sample, ICA, NMF, the random directions and the bootstrap."""
    n_boot: int = 1000
    """Bootstrap draws over the report split's images for the CI."""
    ci: float = 0.95
    """Coverage of the percentile bootstrap interval."""
    select_split: str = "val"
    """Split on which each method's best unit per concept is chosen."""
    report_split: str = "test"
    """Split on which the chosen unit's AUROC and CI are reported."""
    batch_images: int = 256
    """Images per batch streamed while scoring."""
    ica_max_iter: int = 500
    """FastICA iterations."""
    nmf_max_iter: int = 200
    """NMF iterations (fit and transform)."""
    n_fit_nmf: int = 10_000
    """NMF is fitted on this prefix of the fit sample (a uniform sample too): its coordinate
    descent costs far more per row than PCA or ICA."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if isinstance(self.methods, str) or not self.methods or bad:
            raise ValueError(
                f"baselines.methods must be a list from {METHODS}, got {self.methods!r}"
            )
        for name in (
            "n_fit",
            "n_fit_nmf",
            "n_boot",
            "batch_images",
            "ica_max_iter",
            "nmf_max_iter",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"baselines.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_components", "n_random"):
            if getattr(self, name) < 0:
                raise ValueError(f"baselines.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.ci < 1:
            raise ValueError(f"baselines.ci must be in (0, 1), got {self.ci}")
        if self.select_split == self.report_split:
            raise ValueError(
                f"baselines.select_split and report_split are both {self.select_split!r}: choose "
                "a unit on one split and report it on another"
            )


@dataclass
class Units:
    """One method's units: a projection of activations and each component's direction.

    Linear methods score `(x - mean_d) @ W_dm`; `encode` (NMF, the SAE) replaces that with a
    function of x. `directions_md` are the components as unit vectors in activation space (the
    direction an edit moves x along: PCA component, ICA mixing column, NMF atom folded back to
    signed space, SAE decoder row). `two_sided` scores each component with both signs.
    """

    name: str
    directions_md: np.ndarray
    two_sided: bool
    W_dm: np.ndarray | None = None
    mean_d: np.ndarray | None = None
    encode: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the fitted scikit-learn estimator, where there is one

    @property
    def n_components(self) -> int:
        return int(self.directions_md.shape[0])

    def project(self, x_nd: np.ndarray) -> np.ndarray:
        """`[n, m]` values of every component on every token (float32)."""
        if self.encode is not None:
            return np.asarray(self.encode(x_nd), dtype=np.float32)
        x = x_nd if self.mean_d is None else x_nd - self.mean_d
        return (x @ self.W_dm).astype(np.float32, copy=False)

    def unit(self, u: int) -> tuple[int, int]:
        """(component, sign) of scored unit u (units m..2m-1 are the components negated)."""
        m = self.n_components
        return (u, 1) if u < m else (u - m, -1)


def _unit_rows(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def fit_baselines(x_nd: np.ndarray, cfg: BaselinesConfig, sae: Any = None) -> dict[str, Units]:
    """Fit every method of `cfg.methods` on the train sample `x_nd` ([n, d_model])."""
    from sklearn.decomposition import NMF, PCA, FastICA

    x_nd = np.asarray(x_nd, dtype=np.float64)
    if x_nd.ndim != 2 or len(x_nd) < 2:
        raise ValueError(f"fit_baselines: x must be [n >= 2, d_model], got {x_nd.shape}")
    d = x_nd.shape[1]
    k = min(cfg.n_components or d, d, len(x_nd))
    mean = x_nd.mean(0)
    out: dict[str, Units] = {}
    for name in cfg.methods:
        t0 = time.perf_counter()
        if name == "neuron":
            out[name] = Units(name, np.eye(d), True, W_dm=np.eye(d))
        elif name == "pca":
            pca = PCA(n_components=k, random_state=cfg.seed).fit(x_nd)
            ratio = pca.explained_variance_ratio_.tolist()
            out[name] = Units(
                name,
                pca.components_,
                True,
                W_dm=pca.components_.T,
                mean_d=pca.mean_,
                info={"explained_variance_ratio": ratio},
                model=pca,
            )
        elif name == "ica":
            ica = FastICA(
                n_components=k,
                whiten="unit-variance",
                max_iter=cfg.ica_max_iter,
                random_state=cfg.seed,
            ).fit(x_nd)
            # sources = (x - mean) @ components_.T; a source moves x along its mixing column
            out[name] = Units(
                name,
                _unit_rows(ica.mixing_.T),
                True,
                W_dm=ica.components_.T,
                mean_d=ica.mean_,
                info={"n_iter": int(ica.n_iter_)},
                model=ica,
            )
        elif name == "nmf":
            nmf = NMF(
                n_components=k, init="nndsvda", max_iter=cfg.nmf_max_iter, random_state=cfg.seed
            ).fit(_sign_split(x_nd[: cfg.n_fit_nmf], mean))
            atoms = nmf.components_[:, :d] - nmf.components_[:, d:]  # back to signed space

            def encode(x, nmf=nmf, mean=mean):
                return nmf.transform(_sign_split(np.asarray(x, np.float64), mean))

            err = float(nmf.reconstruction_err_)
            out[name] = Units(
                name,
                _unit_rows(atoms),
                False,
                encode=encode,
                info={"n_iter": int(nmf.n_iter_), "reconstruction_err": err, "mean": mean},
                model=nmf,
            )
        elif name == "random":
            rng = np.random.default_rng(cfg.seed)
            n = cfg.n_random or (max(int(sae.W_dec.shape[0]) // 2, 1) if sae is not None else d)
            dirs = _unit_rows(rng.standard_normal((n, d)))
            out[name] = Units(name, dirs, True, W_dm=dirs.T, mean_d=mean)
        elif name == "sae":
            if sae is None:
                raise ValueError("baselines.methods lists 'sae' but no SAE was given")
            out[name] = _sae_units(sae, d)
        out[name].info["fit_s"] = time.perf_counter() - t0
    return out


def _sign_split(x_nd: np.ndarray, mean_d: np.ndarray) -> np.ndarray:
    c = x_nd - mean_d
    return np.concatenate([np.maximum(c, 0), np.maximum(-c, 0)], axis=1)


def _sae_units(sae: Any, d: int) -> Units:
    import torch

    W_dec = sae.W_dec.detach().float().cpu().numpy()
    if W_dec.shape[1] != d:
        raise ValueError(f"the SAE expects d_model {W_dec.shape[1]}, the activations have {d}")

    def encode(x):
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(np.asarray(x, np.float32))).float().cpu().numpy()

    return Units("sae", _unit_rows(W_dec), False, encode=encode)


def image_scores(
    units: dict[str, Units], batches: Any, n_prefix_tokens: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each image's highest patch value of every unit: `(image_id [i], {method: [i, u]})`.

    `batches` yields `(image_id, token, acts)` with each image's tokens together and contiguous
    (`loaders.iter_image_batches`); tokens below `n_prefix_tokens` (CLS, registers) are skipped.
    A two-sided method's units m..2m-1 hold the highest negated value (minus the lowest).
    """
    ids: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in units}
    for image_id, token, acts in batches:
        keep = np.asarray(token) >= n_prefix_tokens
        image_id, acts = np.asarray(image_id)[keep], np.asarray(acts, np.float32)[keep]
        if len(image_id) == 0:
            continue
        starts = np.r_[0, np.flatnonzero(np.diff(image_id)) + 1]
        ids.append(image_id[starts])
        for name, u in units.items():
            p_nm = u.project(acts)
            hi = np.maximum.reduceat(p_nm, starts, axis=0)
            if u.two_sided:
                hi = np.concatenate([hi, -np.minimum.reduceat(p_nm, starts, axis=0)], axis=1)
            parts[name].append(hi)
    if not ids:
        raise ValueError("image_scores: the batches held no patch tokens")
    image_id = np.concatenate(ids)
    if len(np.unique(image_id)) != len(image_id):
        raise ValueError("image_scores: an image's tokens arrived split across batches")
    return image_id, {name: np.concatenate(p) for name, p in parts.items()}


def auroc_matrix(s_iu: np.ndarray, y_il: np.ndarray) -> np.ndarray:
    """`[u, l]` AUROC of every score column against every label column (ties count one half).

    Mann-Whitney from average ranks, so it equals `sklearn.metrics.roc_auc_score` column by
    column; NaN where a label has no positive or no negative image.
    """
    s_iu = np.asarray(s_iu, dtype=np.float64)
    y = np.asarray(y_il, dtype=np.float64)
    r_iu = rankdata(s_iu, axis=0)
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r_iu.T @ y - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def bootstrap_auroc(s_i: np.ndarray, y_i: np.ndarray, idx_bi: np.ndarray) -> np.ndarray:
    """AUROC of one score column on each bootstrap draw of images (`idx_bi`, rows of indices);
    NaN for a draw with no positive or no negative."""
    s = np.asarray(s_i, np.float64)[idx_bi]
    y = np.asarray(y_i, bool)[idx_bi]
    r = rankdata(s, axis=1)
    n_pos = y.sum(1).astype(np.float64)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        a = ((r * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    a[(n_pos == 0) | (n_neg == 0)] = np.nan
    return a


def label_matrix(
    image_id: np.ndarray, image_labels: pd.DataFrame, names: Sequence[str]
) -> np.ndarray:
    """`[i, l]` booleans: does image i carry label l (long `image_id`, `label` table)."""
    y = np.zeros((len(image_id), len(names)), dtype=bool)
    i = pd.Index(np.asarray(image_id, np.int64)).get_indexer(
        image_labels["image_id"].astype(np.int64)
    )
    j = pd.Index([str(n) for n in names]).get_indexer(image_labels["label"].astype(str))
    ok = (i >= 0) & (j >= 0)
    y[i[ok], j[ok]] = True
    return y


def select_and_report(
    units: dict[str, Units],
    select: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    report: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    names: Sequence[str],
    cfg: BaselinesConfig,
) -> pd.DataFrame:
    """The tidy table: per method and concept the best unit on `select`, reported on `report`.

    `select` and `report` are `(image_id, scores {method: [i, u]}, labels [i, l])`. Ties on the
    select split go to the lowest unit. The bootstrap draws are shared by every row; with an
    "sae" method, each other row's `diff_lo`/`diff_hi` is the CI of its AUROC minus the SAE's on
    the same draws and `diff_p` the two-sided paired bootstrap p (2 x the smaller share of draws
    on either side of 0, at most 1); NaN for the SAE's own rows and without an SAE.
    """
    _, s_sel, y_sel = select
    _, s_rep, y_rep = report
    rng = np.random.default_rng(cfg.seed)
    idx_bi = rng.integers(0, len(y_rep), size=(cfg.n_boot, len(y_rep)))
    q = (1 - cfg.ci) / 2
    rows, boots = [], []
    for name, u in units.items():
        a_sel = auroc_matrix(s_sel[name], y_sel)  # [u, l]
        for j, concept in enumerate(names):
            col = a_sel[:, j]
            if np.isnan(col).all():
                continue  # no positive or no negative on the select split
            best = int(np.argmax(np.where(np.isnan(col), -np.inf, col)))
            comp, sign = u.unit(best)
            s_i = s_rep[name][:, best]
            test = auroc_matrix(s_i[:, None], y_rep[:, [j]])[0, 0]
            boot_all = bootstrap_auroc(s_i, y_rep[:, j], idx_bi)  # [b], NaN on one-class draws
            boots.append(boot_all)
            boot = boot_all[~np.isnan(boot_all)]
            lo, hi = np.quantile(boot, [q, 1 - q]) if len(boot) else (np.nan, np.nan)
            rows.append(
                {
                    "method": name,
                    "concept": str(concept),
                    "unit": comp,
                    "sign": sign,
                    "auroc_val": float(col[best]),
                    "auroc_test": float(test),
                    "lo": float(lo),
                    "hi": float(hi),
                    "n_units": int(col.shape[0]),
                    "diff_lo": np.nan,
                    "diff_hi": np.nan,
                    "diff_p": np.nan,
                    "n_test_images": int(len(y_rep)),
                    "n_test_pos": int(y_rep[:, j].sum()),
                    "select_split": cfg.select_split,
                    "report_split": cfg.report_split,
                    "direction": (sign * u.directions_md[comp]).astype(np.float32).tolist(),
                }
            )
    sae_boot = {r["concept"]: b for r, b in zip(rows, boots, strict=True) if r["method"] == "sae"}
    for r, b in zip(rows, boots, strict=True):
        ref = sae_boot.get(r["concept"])
        if r["method"] == "sae" or ref is None:
            continue
        diff = (b - ref)[~(np.isnan(b) | np.isnan(ref))]  # same draws: paired
        if len(diff):
            r["diff_lo"], r["diff_hi"] = (float(v) for v in np.quantile(diff, [q, 1 - q]))
            r["diff_p"] = float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def image_labels_of(shard_dir: str | Path) -> pd.DataFrame:
    """The shard set's image labels as a long (image_id, label) table, as the stats stage takes
    them: `images.parquet` `labels`, else every label one of the image's patches carries."""
    shard_dir = Path(shard_dir)
    if (shard_dir / shards.IMAGES).exists():
        images = shards.read_images(shard_dir)
        if "labels" in images.columns:
            long = images[["image_id", "labels"]].explode("labels").dropna()
            return long.rename(columns={"labels": "label"}).reset_index(drop=True)
    patch = shards.read_patch_labels(shard_dir)
    if len(patch) == 0:
        raise ValueError(
            f"{shard_dir}: no image labels ({shards.IMAGES} 'labels') and no patch labels"
        )
    return patch[["image_id", "label"]].drop_duplicates().reset_index(drop=True)


def sae_vs_baselines(
    shard_dir: str | Path,
    sae_dir: str | Path | None,
    cfg: BaselinesConfig = BaselinesConfig(),
    layer: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, Units]]:
    """Fit the baselines on `shard_dir`'s train split and score them beside the SAE in `sae_dir`.

    `layer` defaults to the SAE's (cfg.json `extra.layer`), else the shard set's first layer.
    Returns the table (`COLUMNS`) and the fitted units (`best_direction` takes both).
    """
    from saev_core.sae import SAE

    m = shards.read_manifest(shard_dir)
    sae = None
    methods = cfg.methods
    if sae_dir is not None:
        from saev_core.sae_io import check_sae_matches

        check_sae_matches(sae_dir, shard_dir)  # refuse an SAE of another backbone or shard set
        sae = SAE.load(sae_dir).eval()
        if layer is None and "layer" in sae.extra:
            layer = int(sae.extra["layer"])
    elif "sae" in methods:
        methods = tuple(x for x in methods if x != "sae")
    cfg = dataclasses.replace(cfg, methods=methods)
    layer = int(m.data["layers"][0]) if layer is None else int(layer)
    n_prefix = int(m.data.get("tokens", {}).get("n_prefix_tokens", 0))
    x_fit = loaders.sample_rows(shard_dir, layer, cfg.n_fit, cfg.seed, ["train"], "patches")
    if progress:
        print(
            f"baselines: fitting {', '.join(methods)} on {len(x_fit)} train patches",
            file=sys.stderr,
        )
    units = fit_baselines(x_fit, cfg, sae)
    if progress:
        fit_s = {k: round(u.info["fit_s"], 1) for k, u in units.items()}
        print(f"baselines: fitted in seconds {fit_s}", file=sys.stderr)
    labels = image_labels_of(shard_dir)
    names = list(m.data.get("labels") or sorted(set(labels["label"].astype(str))))
    scored = []
    for split in (cfg.select_split, cfg.report_split):
        if not m.files(layer, [split]):
            raise ValueError(f"{shard_dir}: no shards of split {split!r} at layer {layer}")
        batches = loaders.iter_image_batches(
            shard_dir, layer, cfg.batch_images, splits=[split], tokens="patches"
        )
        t0 = time.perf_counter()
        image_id, scores = image_scores(units, batches, n_prefix)
        if progress:
            took = time.perf_counter() - t0
            print(
                f"baselines: scored {len(image_id)} {split} images in {took:.1f} s", file=sys.stderr
            )
        scored.append((image_id, scores, label_matrix(image_id, labels, names)))
    table = select_and_report(units, scored[0], scored[1], names, cfg)
    return table, units


def best_direction(table: pd.DataFrame, concept: str, method: str = "pca") -> np.ndarray:
    """`[d_model]` unit vector of `method`'s best unit for `concept` (sign applied): the direction
    to edit along, e.g. the best PCA direction beside the SAE feature. `table` is the table of
    `sae_vs_baselines` or one read back with `read_baselines`."""
    rows = table[(table["method"] == method) & (table["concept"] == concept)]
    if rows.empty:
        raise ValueError(
            f"no {method!r} row for concept {concept!r} (methods {sorted(set(table['method']))}, "
            f"concepts {sorted(set(table['concept']))})"
        )
    return np.asarray(rows.iloc[0]["direction"], dtype=np.float32)


def write_baselines(
    table: pd.DataFrame, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write the table as Parquet (atomically; `meta` as JSON in the schema metadata)."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"write_baselines: the table lacks columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = pa.Table.from_pandas(table[list(COLUMNS)], preserve_index=False)
    t = t.replace_schema_metadata(
        {**(t.schema.metadata or {}), b"saev": json.dumps(meta or {}).encode()}
    )
    shards.atomic_write_table(t, path)
    return path


def read_baselines(path: str | Path) -> pd.DataFrame:
    """The table `write_baselines` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baselines table not found: {path}")
    return pd.read_parquet(path)


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUROC per method over concepts, and on how many concepts it is better or worse
    than the SAE, paired: the CI of its AUROC minus the SAE's on the same bootstrap draws
    (`diff_lo`, `diff_hi`) lies wholly above 0 (`better_than_sae`) or below it (`worse_than_sae`).
    Overlapping CIs are not tested: paired differences are tighter than two separate CIs."""
    out = table.groupby("method", sort=False)["auroc_test"].agg(["mean", "min", "max"])
    if "sae" in set(table["method"]):
        g = table.groupby("method", sort=False)
        out["better_than_sae"] = g["diff_lo"].apply(lambda v: int((v > 0).sum()))
        out["worse_than_sae"] = g["diff_hi"].apply(lambda v: int((v < 0).sum()))
        out["n_units"] = g["n_units"].max()
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    """`saev baselines`: the SAE against neurons, PCA, ICA, NMF and random directions."""
    p = argparse.ArgumentParser(prog="saev baselines", description=main.__doc__)
    p.add_argument("--shards", required=True, help="shard set (manifest.json, images.parquet)")
    p.add_argument("--sae", default=None, help="SAE checkpoint directory to compare")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the SAE's)")
    p.add_argument("--out", default=None, help="Parquet file for the table")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--n-fit", type=int, default=BaselinesConfig.n_fit)
    p.add_argument("--n-boot", type=int, default=BaselinesConfig.n_boot)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = BaselinesConfig(
        methods=tuple(x.strip() for x in a.methods.split(",") if x.strip()),
        n_fit=a.n_fit,
        n_boot=a.n_boot,
        seed=a.seed,
    )
    table, _ = sae_vs_baselines(a.shards, a.sae, cfg, a.layer, progress=True)
    if a.out:
        write_baselines(
            table, a.out, {"shards": str(a.shards), "sae": a.sae, "cfg": dataclasses.asdict(cfg)}
        )
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.drop(columns=["direction"]).round(3).to_string(index=False))
        print()
        print(headline(table).round(3).to_string(index=False))
    return 0
