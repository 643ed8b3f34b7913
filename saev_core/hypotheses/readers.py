"""What reads the model, the evaluation images, and the cache a run shares.

`Reader` is a model plus the head whose probabilities experiments measure (the demo classifier,
or a linear probe from `probes.py` on a backbone; `load_reader` builds it), with `probs` under
splices and `probs_stacked` for an edit and its controls stacked along the batch
(`intervene.stacked_splice`). `EvalSet` holds a hypothesis's preprocessed evaluation images and
their unedited predictions; `Cache` keeps readers, SAEs, stats and image sets across the
hypotheses of one run. `_scope` and `_edit` turn a hypothesis into the tokens and the
`FeatureEdit` of one strength.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from saev_core.geometry import read_geometry
from saev_core.hypotheses.config import Hypothesis, Settings
from saev_core.intervene.layout import (
    TokenLayout,
    measure_layout,
    patches_in_bbox,
    patches_in_mask,
    scope_tokens,
)
from saev_core.intervene.splicing import FeatureEdit, Splice, splice, stacked_splice

# ---------------------------------------------------------------------------------------------
# what reads the model


@dataclass
class Reader:
    """A model plus the head whose probabilities experiments measure."""

    kind: Literal["multilabel", "softmax", "segmentation"]
    labels: list[str]
    blocks: Any
    layout: TokenLayout
    preprocess: Any
    forward: Any
    """pixel_values -> probabilities: [B, C], or [B, n_patches, C] for segmentation."""
    model: Any = None
    """The module `forward` runs: the classifier, or the backbone a probe reads."""
    probe: Any = None
    """The probe on `model`'s last hidden state (None: the classifier's own head)."""

    def probs(
        self, pixels: torch.Tensor, batch_size: int, splices=(), per_image=None
    ) -> np.ndarray:
        """Probabilities over all images; `per_image(splice, idx)` narrows per-image tokens."""
        out = []
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                sl = slice(i, i + batch_size)
                batch = [replace(s, tokens=_rows(s.tokens, sl)) for s in splices]
                with splice(self.blocks, *batch):
                    out.append(self.forward(pixels[sl]).float().cpu())
                for s, b in zip(splices, batch, strict=True):  # per-batch stats -> whole run
                    n = s.stats.get("n_tokens", 0) + b.stats.get("n_tokens", 0)
                    total = s.stats.get("dx_sum", 0.0) + b.stats.get("dx_norm", 0.0) * b.stats.get(
                        "n_tokens", 0
                    )
                    s.stats = {"n_tokens": n, "dx_sum": total, "dx_norm": total / max(1, n)}
        return torch.cat(out).numpy()

    def probs_stacked(
        self, pixels: torch.Tensor, conditions: list[Splice], rows: int
    ) -> np.ndarray:
        """[K, n_images, ...] probabilities under each of K conditions (one layer, one SAE),
        stacked along the batch after the SAE layer (`intervene.stacked_splice`): the blocks
        before it run once per image for a group of conditions, with at most `rows` images x
        conditions per forward pass (more than `rows` conditions go in groups of `rows`, one
        image at a time). Each condition's `stats` covers the whole run."""
        if rows < 1:
            raise ValueError(f"probs_stacked: rows must be >= 1, got {rows}")
        if len(conditions) > rows:
            parts = [
                self.probs_stacked(pixels, list(conditions[i : i + rows]), rows)
                for i in range(0, len(conditions), rows)
            ]
            return np.concatenate(parts, axis=0)
        k = len(conditions)
        b = max(1, rows // k)
        out, n_tok, dx_sum = [], [0] * k, [0.0] * k
        with torch.inference_mode():
            for i in range(0, len(pixels), b):
                sl = slice(i, i + b)
                m = len(pixels[sl])
                # one slice per distinct tokens tensor, so that conditions sharing an edit and
                # its tokens (the random directions) share its per-token norms in the hook
                sliced = {id(s.tokens): _rows(s.tokens, sl) for s in conditions}
                batch = [replace(s, tokens=sliced[id(s.tokens)], stats={}) for s in conditions]
                with stacked_splice(self.blocks, batch):
                    p = self.forward(pixels[sl]).float().cpu()
                if p.shape[0] != k * m:
                    raise ValueError(
                        f"stacked forward: {k} conditions x {m} images gave {p.shape[0]} rows; "
                        "this model's head does not keep the batch the blocks pass it"
                    )
                out.append(p.reshape(k, m, *p.shape[1:]))
                for c, s in enumerate(batch):
                    n_tok[c] += s.stats.get("n_tokens", 0)
                    dx_sum[c] += s.stats.get("dx_norm", 0.0) * s.stats.get("n_tokens", 0)
        for c, s in enumerate(conditions):
            s.stats = {
                "n_tokens": n_tok[c],
                "dx_sum": dx_sum[c],
                "dx_norm": dx_sum[c] / max(1, n_tok[c]),
            }
        return torch.cat(out, dim=1).numpy()

    def predictions(self, p: np.ndarray) -> np.ndarray:
        """Bool predictions: p > 0.5 (multi-label), else one-hot argmax ([B, C] or [B, P, C])."""
        if self.kind == "multilabel":
            return p > 0.5
        return np.eye(p.shape[-1], dtype=bool)[p.argmax(-1)]


def _rows(tokens, sl):
    return tokens[sl] if tokens is not None and tokens.dim() == 2 else tokens


def load_reader(h: Hypothesis, device: str = "cpu") -> Reader:
    """The classifier or probe of a hypothesis, with its blocks and token layout."""
    if h.task == "classifier":
        from transformers import AutoImageProcessor

        from saev_core.backbone.hooks import classifier_blocks
        from saev_core.backbone.load import load_classifier

        model, id2label = load_classifier(h.model, device=device)
        processor = AutoImageProcessor.from_pretrained(h.model)
        blocks = classifier_blocks(model)

        def prep(images):
            return processor(images=images, return_tensors="pt")["pixel_values"].to(device)

        layout = measure_layout(model, blocks, prep(images=[_blank()]))
        geometry, why = read_geometry(processor)
        layout = replace(layout, geometry=geometry, geometry_error=why)
        multi = model.config.problem_type == "multi_label_classification"

        def forward(px):
            logits = model(pixel_values=px).logits
            return torch.sigmoid(logits) if multi else logits.softmax(-1)

        labels = [id2label[i] for i in sorted(id2label)]
        kind = "multilabel" if multi else "softmax"
        return Reader(kind, labels, blocks, layout, prep, forward, model=model)

    from saev_core.backbone.hooks import preprocess
    from saev_core.backbone.load import load_backbone
    from saev_core.probes import load_probe

    bb = load_backbone(h.model, device=device, dtype="float32")
    probe, meta = load_probe(h.probe_dir)
    if meta.get("weights_sha256") not in (None, bb.weights_sha256):
        raise ValueError(f"probe {h.probe_dir} was trained on other weights than {h.model}")
    probe = probe.to(device)

    def forward(px):
        return probe.probs(bb.model(pixel_values=px).last_hidden_state)

    kind = "segmentation" if probe.task == "segmentation" else "multilabel"
    return Reader(
        kind,
        probe.classes,
        bb.blocks,
        TokenLayout.of_backbone(bb),
        lambda images: preprocess(bb, images),
        forward,
        model=bb.model,
        probe=probe,
    )


def _blank():
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))


@dataclass
class EvalSet:
    """Evaluation images of a hypothesis, preprocessed, with the unedited predictions."""

    records: list
    images: list[np.ndarray]
    pixels: torch.Tensor
    p_before: np.ndarray
    gt: np.ndarray | None = None
    """Segmentation: ground-truth class per patch [n, n_patches]."""


@dataclass
class Cache:
    """Models, SAEs, stats and image sets shared by the hypotheses of one run."""

    settings: Settings = field(default_factory=Settings)
    readers: dict = field(default_factory=dict)
    saes: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)
    checked: set = field(default_factory=set)

    def reader(self, h: Hypothesis) -> Reader:
        key = (h.task, h.model, h.probe_dir)
        if key not in self.readers:
            self.readers[key] = load_reader(h, self.settings.device)
        return self.readers[key]

    def sae(self, sae_dir: str, model: str | None = None, stats_dir: str | None = None):
        """The SAE, after refusing a `model` it was not trained on and `stats_dir` stats computed
        from another SAE (`sae.checks.check_sae_model` / `check_stats_match`)."""
        from saev_core.sae.checks import check_sae_model, check_stats_match

        if model is not None and ("model", sae_dir, model) not in self.checked:
            check_sae_model(sae_dir, model)
            self.checked.add(("model", sae_dir, model))
        if stats_dir is not None and ("stats", sae_dir, stats_dir) not in self.checked:
            check_stats_match(stats_dir, sae_dir)
            self.checked.add(("stats", sae_dir, stats_dir))
        if sae_dir not in self.saes:
            from saev_core.sae.model import SAE

            self.saes[sae_dir] = SAE.load(sae_dir, device=self.settings.device).eval()
        return self.saes[sae_dir]

    def features(self, stats_dir: str):
        if stats_dir not in self.stats:
            import pandas as pd

            self.stats[stats_dir] = pd.read_parquet(Path(stats_dir) / "features.parquet")
        return self.stats[stats_dir]

    def evalset(self, h: Hypothesis, reader: Reader) -> EvalSet:
        key = (h.task, h.model, h.probe_dir, h.data, h.split, h.val_fraction)
        if key not in self.sets:
            from PIL import Image

            from saev_core.data.images import open_image
            from saev_core.data.records import load_records

            records = load_records(h.data, [h.split], h.val_fraction)
            images = [np.asarray(open_image(r)) for r in records]
            pixels = reader.preprocess([Image.fromarray(im) for im in images])
            p = reader.probs(pixels, self.settings.batch_size)
            gt = None
            if reader.kind == "segmentation":
                from saev_core.probes import patch_targets

                lay = reader.layout
                gt = np.stack(
                    [
                        patch_targets(r, reader.labels, lay.grid, lay.geometry or lay.image_size)
                        for r in records
                    ]
                )
            self.sets[key] = EvalSet(records, images, pixels, p, gt)
        return self.sets[key]


def _scope(h: Hypothesis, reader: Reader, es: EvalSet, idx: np.ndarray) -> torch.Tensor:
    lay = reader.layout
    if h.scope in ("all", "patches", "cls"):
        return scope_tokens(lay, h.scope)
    if h.scope == "region":
        masks = [patches_in_bbox(lay, h.bbox, es.images[i].shape[:2]) for i in idx]
    else:  # the target's own pixels, from each image's mask
        from saev_core.data.images import open_mask

        masks = []
        for i in idx:
            r = es.records[i]
            values = [v for v, labs in r.mask_labels.items() if h.target in labs]
            m = np.isin(open_mask(r), values) if values else np.zeros(es.images[i].shape[:2], bool)
            masks.append(patches_in_mask(lay, m))
    return scope_tokens(lay, "region", np.stack(masks))


def _edit(h: Hypothesis, feats: list[int], strength: float, max_act: Any) -> FeatureEdit:
    acts = tuple(float(max_act.get(f, 0.0)) for f in feats)
    return FeatureEdit(h.op, tuple(feats), float(strength), acts if h.relative else None)
