"""The TopK L0/FVU frontier on the demo's shards: today's defaults, the new ones, and a reference.

Issue 13, point 1, at its data and budget: the demo's shards (`artifacts/activations/shapes`,
layer 2), patch tokens only, 4,000 train and 500 val images (256,000 and 32,000 tokens), three
epochs (768,000 training tokens, 750 steps), 1,024 features, batch 1,024, lr 2e-3 with 20
warm-up steps, AuxK over 256 latents. The tokens are held in memory and permuted per epoch with
a fixed seed, so every trainer sees the very same batches in the same order and the loader is
out of the picture. For each k in `--ks` it trains one TopK SAE with `OLD` (the training
defaults before issue 13) and one with today's `TrainConfig` defaults, each in its own
`train_sae` run, and reports val FVU, L0, dead and dense shares and the training loop's
tokens/s.

The reference is overcomplete 0.3.0's `TopKSAE` trained by its own `train_sae` (Adam, its
`CosineScheduler` with the same warm-up and end lr, gradient clipping 1.0), with the plain MSE
of its README or, with `--reference-loss auxk`, MSE + `top_k_auxiliary_loss`, its AuxK (over
half the unkept latents, weight 0.1; at k = 32 FVU 0.071 against 0.062 for plain MSE, and a
slower loop). overcomplete needs torchvision, timm and opencv for its model zoo, so it lives in
a venv of its own, passed as `--reference-python`: torch 2.13.0 (CPU) first, then
`pip install --no-deps overcomplete==0.3.0` plus einops, numpy, scipy, scikit-learn,
scikit-image, opencv-python-headless, "matplotlib<3.9", tqdm and pillow. The child imports it
with a stub `torchvision` module, which only its model zoo uses. It gets our normalised inputs
(mean-centred, mean norm sqrt(d), as our SAE normalises); FVU is scale-free, so its val FVU
compares with ours directly.

    .venv/bin/python bench/frontier.py --reference-python /tmp/refvenv/bin/python
    .venv/bin/python bench/frontier.py --ks 32 --no-old         # new defaults at k = 32 only

Prints one JSON line last. Timings on a shared CPU are noisy: read the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saev_core import loaders
from saev_core.training import TrainConfig, evaluate, fit_normalisation, train_sae

SHARDS = Path(__file__).resolve().parent.parent / "artifacts" / "activations" / "shapes"

# The settings, shared by every run (the demo's params.yaml, patch tokens only).
SETTINGS = dict(
    arch="topk",
    d_sae=1024,
    lr=2e-3,
    warmup_steps=20,
    batch_size=1024,
    n_epochs=3,
    aux_k=256,
    dead_after_tokens=100_000,
    seed=0,
    device="cpu",
    checkpoint_every=0,
    log_every=10**6,
)

# The TrainConfig defaults before issue 13 that the new defaults change (the rest are shared).
OLD: dict = {"encoder_init_scale": 1.0}

REFERENCE = r"""
import json, sys, time, types
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[3]))
tv = types.ModuleType("torchvision")  # only overcomplete's model zoo imports it
tv.transforms = types.ModuleType("torchvision.transforms")
sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
import overcomplete
from overcomplete.sae import TopKSAE, train_sae
from overcomplete.sae.losses import top_k_auxiliary_loss
from overcomplete.sae.optimizer import CosineScheduler

data = np.load(sys.argv[1])
train, val, perms = (torch.from_numpy(data[n]) for n in ("train", "val", "perms"))
s = json.loads(sys.argv[2])

class Epochs:  # the same batches, in the same order, as the bench's own runs
    def __init__(self):
        self.epoch = 0
    def __iter__(self):
        perm = perms[self.epoch]
        self.epoch += 1
        for i in range(0, len(perm), s["batch_size"]):
            yield train[perm[i : i + s["batch_size"]]]

out = []
for k in s["ks"]:
    torch.manual_seed(s["seed"])
    sae = TopKSAE(train.shape[1], nb_concepts=s["d_sae"], top_k=k, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=s["lr"])
    n_steps = s["n_epochs"] * (-(-train.shape[0] // s["batch_size"]))
    sched = CosineScheduler(opt, s["lr"], s["lr"] * s["lr_end_frac"], n_steps, s["warmup_steps"])
    t = time.perf_counter()
    mse = lambda x, x_hat, pre, z, dictionary: (x - x_hat).square().mean()
    loss = top_k_auxiliary_loss if s["reference_loss"] == "auxk" else mse
    train_sae(sae, Epochs(), loss, opt, sched, nb_epochs=s["n_epochs"],
              clip_grad=1.0, monitoring=0)
    seconds = time.perf_counter() - t
    sae.eval()
    with torch.no_grad():
        _, z, x_hat = sae(val)
    fvu = float((val - x_hat).pow(2).sum() / (val - val.mean(0)).pow(2).sum())
    out.append({"k": k, "fvu": fvu, "l0": float((z > 0).sum(1).float().mean()),
                "tokens_per_s": n_steps * s["batch_size"] / seconds})
print(json.dumps({"version": overcomplete.__version__, "runs": out}))
"""


def load_split(shard_dir: Path, split: str) -> torch.Tensor:
    """Every patch token of one split of layer 2, in file order, as float32 [n, d]."""
    parts = [x for _, _, x in loaders.iter_ordered(shard_dir, 2, splits=[split], tokens="patches")]
    if not parts:
        raise ValueError(f"{shard_dir}: no patch tokens in split {split!r}")
    return torch.from_numpy(np.concatenate(parts))


def permutations(n: int, n_epochs: int, seed: int) -> list[torch.Tensor]:
    """One fixed permutation of the training tokens per epoch."""
    return [
        torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
        for e in range(n_epochs)
    ]


def run_ours(
    train: torch.Tensor, val: torch.Tensor, perms: list[torch.Tensor], cfg: TrainConfig
) -> dict:
    """One `train_sae` run on the fixed batches; val metrics and the loop's tokens/s."""

    def make_batches(epoch: int) -> list[torch.Tensor]:
        p = perms[epoch]
        return [train[p[i : i + cfg.batch_size]] for i in range(0, len(p), cfg.batch_size)]

    sae, summary = train_sae(make_batches, train.shape[1], cfg, progress=False)
    ev = evaluate(sae, val.split(4096), dense_threshold=cfg.dense_threshold)
    return {
        "k": cfg.k,
        "fvu": round(ev["fvu"], 4),
        "l0": round(ev["l0"], 2),
        "dead_frac": round(ev["dead_frac"], 4),
        "dense_frac": round(ev["dense_frac"], 4),
        "dense_frac_abs": round(ev["dense_frac_abs"], 4),
        "tokens_per_s": round(summary["tokens_per_s"], 1),
    }


def run_reference(
    python: str,
    train: torch.Tensor,
    val: torch.Tensor,
    perms: list[torch.Tensor],
    ks: list[int],
    threads: int,
    loss: str,
) -> dict:
    """overcomplete's TopK in its own venv on the same (normalised) batches; see the docstring."""
    mean_d, scale = fit_normalisation([train[perms[0][:100_000]]], TrainConfig().norm_max_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        data, script = Path(tmp) / "data.npz", Path(tmp) / "reference.py"
        norm = lambda x: ((x.double() - mean_d.double()) * scale).float().numpy()  # noqa: E731
        np.savez(data, train=norm(train), val=norm(val), perms=torch.stack(perms).numpy())
        script.write_text(REFERENCE)
        settings = {**SETTINGS, "ks": ks, "lr_end_frac": TrainConfig().lr_end_frac}
        settings["reference_loss"] = loss
        proc = subprocess.run(
            [python, str(script), str(data), json.dumps(settings), str(threads)],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({python}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shard-dir", type=Path, default=SHARDS)
    p.add_argument("--ks", default="8,16,32,64")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads, here and in the reference"
    )
    p.add_argument("--reference-python", help="python of a venv with overcomplete 0.3.0")
    p.add_argument("--reference-ks", help="k values for the reference (default: --ks)")
    p.add_argument(
        "--reference-loss",
        choices=("mse", "auxk"),
        default="mse",
        help="the reference's criterion: plain MSE (its README) or MSE + its top_k_auxiliary_loss",
    )
    p.add_argument("--no-old", action="store_true", help="skip the runs with the old defaults")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    train, val = (
        load_split(args.shard_dir, "train").float(),
        load_split(args.shard_dir, "val").float(),
    )
    perms = permutations(train.shape[0], SETTINGS["n_epochs"], seed=1000)
    result: dict = {
        "bench": "frontier",
        "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "train_tokens": int(train.shape[0]) * SETTINGS["n_epochs"],
        "val_tokens": int(val.shape[0]),
        "settings": SETTINGS,
        "old_defaults": OLD,
    }
    t = time.perf_counter()
    for name, over in (("old", OLD), ("new", {})):
        if name == "old" and args.no_old:
            continue
        runs = []
        for k in ks:
            r = run_ours(train, val, perms, TrainConfig(**{**SETTINGS, **over, "k": k}))
            print(f"{name}: {r}", flush=True)
            runs.append(r)
        result[name] = runs
    if args.reference_python:
        ref_ks = [int(k) for k in (args.reference_ks or args.ks).split(",")]
        ref = run_reference(
            args.reference_python, train, val, perms, ref_ks, args.threads, args.reference_loss
        )
        result["reference"] = {
            "name": f"overcomplete {ref['version']} TopKSAE + train_sae",
            "loss": args.reference_loss,
            "runs": [
                {k: round(v, 4) if k == "fvu" else v for k, v in r.items()} for r in ref["runs"]
            ],
        }
        print(f"reference: {result['reference']}", flush=True)
        new_by_k = {r["k"]: r for r in result["new"]}
        result["speedup_vs_reference"] = {
            r["k"]: round(new_by_k[r["k"]]["tokens_per_s"] / r["tokens_per_s"], 2)
            for r in ref["runs"]
            if r["k"] in new_by_k
        }
    for name in ("old", "new"):
        if name in result:
            fvus = [r["fvu"] for r in result[name]]
            result[f"{name}_monotone"] = all(a > b for a, b in zip(fvus, fvus[1:], strict=False))
    result["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
