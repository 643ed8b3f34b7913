"""What `saev explore` serves: `ExploreConfig` and `resolve_config` (its defaults from
params.yaml), the app's limits, `ExploreError`, and the checks of a run's paths at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8050
DEFAULT_HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD_BYTES = 4 * 2**20
"""Uploads above 4 MiB are refused (413) before they are decoded."""
UPLOAD_MAX_PIXELS = 16_000_000
"""An upload decodes to at most 16 MP (about 48 MB of RGB), whatever its compressed size."""
TOP_CLASSES = 5
MAX_UPLOADS = 64
"""Uploads kept (their bytes, at most 4 MiB each; the least recently added goes first)."""
MAX_PNGS = 1024
"""Served image views kept (small PNGs: exemplar thumbnails need no forward)."""


class ExploreError(Exception):
    """A request the app refuses: an HTTP status and a reason for the page."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class ExploreConfig:
    """Which run `saev explore` serves; the defaults come from params.yaml (`resolve_config`)."""

    model: str
    """The classifier, or the backbone the probes read (`intervene.model`)."""
    sae_dir: str
    """The SAE; it is spliced at the layer its cfg.json records (`intervene.sae_dir`)."""
    stats_dir: str
    """Its stats: max activations (slider units), frequencies, exemplars, labels."""
    data: str
    """The image source (`intervene.data`)."""
    split: str = "test"
    """The split the picker starts on (`intervene.split`)."""
    probe_dir: str = ""
    """A probe directory, or a probes out_dir holding classification/ and segmentation/
    (`probe.out_dir`); '' = none."""
    probe_required: bool = False
    """Refuse to start when `probe_dir` holds no probe (it was given on the command line)."""
    device: str = "cpu"
    """Where the models run."""
    val_fraction: float = 0.1
    """A source without a val split: the share of train held out as val (as extraction did)."""
    n_exemplars: int = 6
    """Exemplars shown per feature."""
    n_labels: int = 3
    """Label associations shown per feature."""
    max_cached_images: int = 64
    """Images whose residual stream, codes and prediction are kept (least recently used out)."""


def _has_head(model: str) -> bool:
    """Whether the model directory or hub id is an image classifier (a trained head to read)."""
    path = Path(model) / "config.json"
    if path.is_file():
        archs = json.loads(path.read_text()).get("architectures") or []
    else:
        try:
            from transformers import AutoConfig

            archs = AutoConfig.from_pretrained(model).architectures or []
        except Exception:
            return False
    return any(str(a).endswith("ForImageClassification") for a in archs)


def _find_probes(probe_dir: str) -> dict[str, Path]:
    """task -> probe directory: `probe_dir` itself when it holds probe.json, else its
    classification/ and segmentation/ sub-folders (a probes out_dir)."""
    if not probe_dir:
        return {}
    root = Path(probe_dir)
    found = {}
    candidates = [root] + [root / t for t in ("classification", "segmentation")]
    for d in candidates:
        meta = d / "probe.json"
        if meta.is_file():
            try:
                task = json.loads(meta.read_text())["task"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{meta}: not a probe description ({e})") from None
            found.setdefault(str(task), d)
    return found


def _check_paths(cfg: ExploreConfig) -> None:
    """Refuse a run whose parts are missing, naming each file, before loading anything."""
    need = [
        (Path(cfg.sae_dir) / "cfg.json", "the SAE (run `saev train`, or give --sae-dir)"),
        (Path(cfg.sae_dir) / "sae.safetensors", "the SAE's weights"),
        (Path(cfg.stats_dir) / "features.parquet", "its stats (run `saev stats`, or --stats-dir)"),
        (Path(cfg.stats_dir) / "top_examples.parquet", "its exemplars (run `saev stats`)"),
    ]
    missing = [f"{p} ({why})" for p, why in need if not p.is_file()]
    if not Path(cfg.data).is_dir():
        missing.append(f"{cfg.data} (the image source, --data)")
    looks_local = cfg.model.startswith((".", "/", "~")) or Path(cfg.model).parts[:1] == (
        "artifacts",
    )
    if looks_local and not Path(cfg.model).is_dir():
        missing.append(f"{cfg.model} (the model, --model)")
    if missing:
        raise FileNotFoundError("cannot serve this run; missing:\n  " + "\n  ".join(missing))


def resolve_config(args: Any) -> ExploreConfig:
    """The run named on the command line, the rest from the params file's `intervene`, `probe`
    and `extract` sections (a missing params file leaves the built-in defaults)."""
    from saev_core.config import load_section
    from saev_core.hypotheses.config import InterveneConfig
    from saev_core.probes import ProbeConfig

    params = Path(args.params)
    if params.exists():
        iv = load_section(params, "intervene", InterveneConfig)
        probe_out = load_section(params, "probe", ProbeConfig).out_dir
    else:
        iv, probe_out = InterveneConfig(), ProbeConfig().out_dir
    return ExploreConfig(
        model=args.model or iv.model,
        sae_dir=args.sae_dir or iv.sae_dir,
        stats_dir=args.stats_dir or iv.stats_dir,
        data=args.data or iv.data,
        split=args.split or iv.split,
        probe_dir=args.probe_dir or probe_out,
        probe_required=bool(args.probe_dir),
        device=args.device,
    )
