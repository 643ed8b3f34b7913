"""The command line of `saev explore`: `parse_args`, `load` (the run, with errors that say what
is missing) and `main` (load, then serve with uvicorn).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from saev_core.explore.app import create_app
from saev_core.explore.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOOPBACK,
    ExploreConfig,
    resolve_config,
)
from saev_core.explore.explorer import Explorer

# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="saev explore",
        description="Serve an interactive app over one run: pick or upload an image, select "
        "patches, see the SAE features that fire there (with exemplars, heat maps and labels "
        "from the stats), move a slider per feature (in units of its largest observed "
        "activation; untouched is not 0) and watch the classifier's or the segmentation "
        "probe's answer change; log an intervention to MLflow. Every run option defaults to "
        "the params file: --model, --sae-dir, --stats-dir, --data and --split from its "
        "`intervene` section, --probe-dir from `probe.out_dir`.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default: %(default)s, this machine only; "
                   "anything else serves the run to the network and is warned about)")  # fmt: skip
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)"
    )
    p.add_argument("--model", help="classifier or backbone directory / hub id (intervene.model)")
    p.add_argument("--sae-dir", help="the SAE (intervene.sae_dir)")
    p.add_argument("--stats-dir", help="its stats (intervene.stats_dir)")
    p.add_argument("--probe-dir", help="a probe, or a probes out_dir with classification/ and "
                   "segmentation/ (probe.out_dir; given here, it must hold a probe)")  # fmt: skip
    p.add_argument("--data", help="image source (intervene.data)")
    p.add_argument("--split", help="split the picker starts on (intervene.split)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="load the run, print what would be served, and exit")  # fmt: skip
    return p.parse_args(argv)


def load(cfg: ExploreConfig) -> Explorer:
    """The run, or a ValueError/FileNotFoundError that says what is missing (no traceback at
    the command line: `saev_core.cli` prints these)."""
    try:
        return Explorer(cfg)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot load the run ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None, log_run: Callable | None = None) -> int:
    """`saev explore`: load the run, then serve it with uvicorn until interrupted."""
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    cfg = resolve_config(args)
    if args.host not in LOOPBACK:
        print(
            f"saev explore: warning: listening on {args.host}: anyone who can reach this "
            "machine can use the app (and upload images to it); the default is 127.0.0.1",
            file=sys.stderr,
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ex = load(cfg)
    info = ex.info()
    print(
        f"saev explore: run {info['run']}, SAE {cfg.sae_dir} at block {info['layer']} "
        f"({info['d_sae']} features), tasks {', '.join(info['tasks'])}, "
        f"{sum(info['n_images'].values())} images"
    )
    if "segmentation" not in ex.readers and not cfg.probe_required:
        print(f"saev explore: no segmentation probe in {cfg.probe_dir or '(none)'}: "
              "classification only")  # fmt: skip
    if args.check:
        return 0
    import uvicorn

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"saev explore: http://{host}:{args.port}/  (Ctrl-C stops)")
    app = create_app(ex, log_run, hosts=(args.host,))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
