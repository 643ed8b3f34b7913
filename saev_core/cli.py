"""`saev`: one command line for every stage, the warehouse queries and the schedule.

    saev shapes [--world forms]       generate a built-in image world (--out DIR)
    saev backbone|extract|validate|train|stats|probe|intervene|warehouse [--params params.yaml]
         [-S KEY=VALUE ...]           run one stage as a Prefect flow (what `dvc repro` calls);
                                      -S overrides a key of its section (-S sae.k=32)
    saev pipeline                     every stage in order, in one process
    saev sql NAME|QUERY [--param k=v] named query from sql/queries/ or read-only ad-hoc SQL
    saev serve                        serve the pipeline on a cron schedule
    saev deploy | worker [--gpu]      deployments and workers on a Prefect server (flows/deploy.py)
    saev doctor                       check the configuration and the services it names
    saev baselines --shards D --sae S one SAE against neurons/PCA/ICA/NMF/random directions
    saev stability --shards D --sae S1 --sae S2   seed stability (Hungarian-matched features)
    saev explore [--port 8050]        interactive app over one run: patches, features, sliders

Sub-commands import their module only when called, so `saev --help` and `saev sql` start fast.
"""

from __future__ import annotations

import importlib
import sys

from saev_core.registry import STAGES

# name -> (module, function, one-line help); the stages come from the registry, in order
COMMANDS = {
    "shapes": ("saev_core.shapes", "main", "generate a built-in world (--world shapes|forms)"),
    **{name: (f"flows.{name}", "main", stage.help) for name, stage in STAGES.items()},
    "pipeline": ("flows.pipeline", "main", "every stage in order, in one process"),
    "sql": ("saev_core.warehouse", "main", "query the warehouse (named query or SQL; --list)"),
    "serve": ("flows.deploy", "main", "serve the pipeline on a cron schedule"),
    "refresh": ("flows.refresh", "main", "new images in extract.data -> shards, stats, warehouse"),
    "deploy": ("flows.deploy", "deploy_main", "register the deployments with a Prefect server"),
    "worker": ("flows.deploy", "worker_main", "start a Prefect worker (--gpu on a GPU machine)"),
    "doctor": ("flows.doctor", "main", "what is configured, what answers, what does not"),
    "baselines": ("saev_core.baselines.run", "main", "SAE vs neurons, PCA, ICA, NMF, random"),
    "stability": (
        "saev_core.stability",
        "main",
        "SAEs of several seeds: matched features vs random",
    ),
    "explore": ("flows.explore", "main", "interactive app over one run (--port 8050)"),
}


def usage() -> str:
    lines = ["usage: saev COMMAND [ARGS...]   (saev COMMAND --help for its options)", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"saev: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"saev {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
