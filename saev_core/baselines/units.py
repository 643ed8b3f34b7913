"""The methods a baselines run compares (`METHODS`), its config (`BaselinesConfig`), and the
fitted bases: `Units` (a projection of activations and each component's direction) and
`fit_baselines` (neurons, PCA, ICA, NMF, random directions, the SAE's features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("neuron", "pca", "ica", "nmf", "random", "sae")


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
