"""`Explorer`: one run loaded for `saev explore` (models, SAE, stats, images), and the answers
the API gives from it.

Over 400 lines because `Explorer` is one class of about 600 lines: its image cache, upload
store, run tables and forwards share one lock and one set of caches, and cutting it into
several classes is a change of code, not a move (this split only moves code). The package
docstring (`saev_core.explore`) describes the fast path and the memory it keeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saev_core.explore.config import (
    MAX_PNGS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOADS,
    TOP_CLASSES,
    UPLOAD_MAX_PIXELS,
    ExploreConfig,
    ExploreError,
    _check_paths,
    _find_probes,
    _has_head,
)
from saev_core.explore.state import (
    HeatMaps,
    _Bytes,
    _ImageState,
    _TaskState,
    resume_after,
    returns_tuple,
)


class Explorer:
    """One run, loaded once: readers, SAE, stats tables, image records; images on demand."""

    def __init__(self, cfg: ExploreConfig):
        import pandas as pd

        from saev_core.backbone.hooks import resolve_layer
        from saev_core.data.images import SPLITS
        from saev_core.data.records import load_records
        from saev_core.hypotheses.config import Settings
        from saev_core.hypotheses.readers import Cache
        from saev_core.hypotheses.selection import _stats_splits, stats_run

        self.cfg = cfg
        self.lock = threading.RLock()
        _check_paths(cfg)
        cache = Cache(Settings(device=cfg.device))
        self.sae = cache.sae(cfg.sae_dir, cfg.model, cfg.stats_dir)  # refuses mismatched runs
        self.readers = self._readers(cfg)
        first = next(iter(self.readers.values()))
        self.layout = first.layout
        trained = self.sae.extra.get("layer")
        if trained is None:
            raise ValueError(f"{cfg.sae_dir}/cfg.json records no layer: which block does it read?")
        self.layer = resolve_layer(int(trained), len(first.blocks))
        self.d_sae = int(self.sae.cfg.d_sae)
        self._tuple_output = {
            t: returns_tuple(r.blocks, self.layer, r.forward, r.layout.image_size, cfg.device)
            for t, r in self.readers.items()
        }
        self._shared = self._shared_forward()

        stats = Path(cfg.stats_dir)
        self.run = stats_run(cfg.stats_dir)
        feats = pd.read_parquet(stats / "features.parquet").set_index("feature")
        self.freq = np.zeros(self.d_sae)
        self.max_act = np.zeros(self.d_sae)
        idx = feats.index.to_numpy()
        self.freq[idx] = feats["freq"].to_numpy()
        self.max_act[idx] = feats["max_act"].to_numpy()

        self.records = load_records(cfg.data, None, cfg.val_fraction)
        self.by_key = {f"{r.split}:{r.image_id}": r for r in self.records}
        found = {r.split for r in self.records}
        self.splits = [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))
        if cfg.split not in self.splits:
            raise ValueError(f"split {cfg.split!r} is not in {cfg.data} (it has {self.splits})")
        self._shard_keys = self._exemplar_keys(stats)
        self._exemplars, self._heat = self._read_exemplars(stats)
        _, report = _stats_splits(stats)
        self._labels = self._read_labels(stats, report)
        self.browser = stats / "browser.html"
        self._states: OrderedDict[str, _ImageState] = OrderedDict()
        self._uploads: OrderedDict[str, bytes] = OrderedDict()
        """upload key -> its bytes (decoded again when its state is evicted and needed)."""
        self._pngs: OrderedDict[str, bytes] = OrderedDict()

    # -- loading -------------------------------------------------------------------------------

    def _readers(self, cfg: ExploreConfig) -> dict[str, Any]:
        """task -> `hypotheses.Reader`: classification from the model's head, else from a
        classification probe; segmentation from a segmentation probe."""
        from saev_core.hypotheses.config import Hypothesis
        from saev_core.hypotheses.readers import load_reader

        probes = _find_probes(cfg.probe_dir)
        if cfg.probe_required and not probes:
            raise FileNotFoundError(
                f"no probe in {cfg.probe_dir} (expected probe.json there, or in its "
                "classification/ or segmentation/ folders: run `saev probe`)"
            )
        readers = {}
        base = {"target": "?", "model": cfg.model}
        if _has_head(cfg.model):
            readers["classification"] = load_reader(Hypothesis(**base), cfg.device)
        for task in ("classification", "segmentation"):
            if task not in probes or task in readers:
                continue
            h = Hypothesis(**base, task="probe", probe_dir=str(probes[task]))
            try:
                readers[task] = load_reader(h, cfg.device)
            except ValueError as e:  # e.g. trained on other weights than this model
                if cfg.probe_required:
                    raise
                print(f"saev explore: {task} probe skipped: {e}", file=sys.stderr)
        if not readers:
            raise ValueError(
                f"nothing reads {cfg.model}: it has no classification head and "
                f"{cfg.probe_dir or 'no probe directory'} holds no probe (run `saev probe`)"
            )
        grids = {tuple(r.layout.grid) for r in readers.values()}
        if len(grids) > 1:
            raise ValueError(f"the readers of {cfg.model} disagree on the patch grid: {grids}")
        return readers

    def _shared_forward(self) -> Callable[[Any], dict[str, Any]] | None:
        """One forward for both tasks, when the segmentation probe reads what the classifier's
        own backbone returns: the classifier's forward, its backbone's last hidden state caught
        on the way (a hook on `base_model`) and given to the probe; or, for a backbone without
        a head, one backbone forward read by both probes. Used only when that matches
        the probe's own forward (the same pixels, probabilities within 1e-5) on a random
        picture; else None, and each task runs its own model."""
        import torch
        from PIL import Image

        clf, seg = self.readers.get("classification"), self.readers.get("segmentation")
        if clf is None or seg is None or seg.probe is None:
            return None
        if len(clf.blocks) != len(seg.blocks) or clf.layout.grid != seg.layout.grid:
            return None
        if clf.probe is not None:  # a backbone without a head: two probes on the same output

            def both(px: Any) -> dict[str, Any]:
                h = clf.model(pixel_values=px).last_hidden_state
                return {"classification": clf.probe.probs(h), "segmentation": seg.probe.probs(h)}

        else:
            base = getattr(clf.model, "base_model", None)
            if not isinstance(base, torch.nn.Module) or base is clf.model:
                return None
            caught: dict[str, Any] = {}

            def catch(module, args, output):
                caught["h"] = getattr(output, "last_hidden_state", None)
                if caught["h"] is None:
                    caught["h"] = output[0]

            def both(px: Any) -> dict[str, Any]:
                handle = base.register_forward_hook(catch)
                try:
                    cls = clf.forward(px)
                finally:
                    handle.remove()
                return {"classification": cls, "segmentation": seg.probe.probs(caught.pop("h"))}

        rng = np.random.default_rng(0)
        picture = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))
        px, px_seg = clf.preprocess([picture]), seg.preprocess([picture])
        if px.shape != px_seg.shape or px.dtype != px_seg.dtype or not torch.equal(px, px_seg):
            return None
        with torch.inference_mode():
            try:
                got = both(px)
            except Exception:  # the base model's output is not a hidden-state tensor
                return None
            want_seg, want_cls = seg.forward(px_seg), clf.forward(px)
        close = all(
            g.shape == w.shape and float((g.float() - w.float()).abs().max()) <= 1e-5
            for g, w in ((got["segmentation"], want_seg), (got["classification"], want_cls))
        )
        return both if close else None

    def _exemplar_keys(self, stats: Path) -> dict[int, str]:
        """Shard image_id -> image key, through the shard set's images.parquet (by the image's
        source key). run.parquet's `shard_dir` is taken as given (absolute or from the working
        directory), else relative to the stats dir or one of its parents (a run moved or served
        from elsewhere). Where it resolves nowhere, a warning and no exemplars: shard ids are
        not the record ids in general, and a guess would show other images."""
        import warnings

        import pandas as pd

        run_path = stats / "run.parquet"
        if not run_path.exists():
            warnings.warn(
                f"{run_path} not found: which shard set? no exemplars shown", stacklevel=2
            )
            return {}
        given = Path(str(pd.read_parquet(run_path, columns=["shard_dir"])["shard_dir"].iloc[0]))
        tries = [given] + (
            [] if given.is_absolute() else [p / given for p in (stats, *stats.parents)]
        )
        path = next((t / "images.parquet" for t in tries if (t / "images.parquet").is_file()), None)
        if path is None:
            warnings.warn(
                f"{run_path}: shard_dir {str(given)!r} has no images.parquet (tried the working "
                f"directory and {stats} and its parents): no exemplars shown",
                stacklevel=2,
            )
            return {}
        images = pd.read_parquet(path)
        if not {"image_id", "key"} <= set(images.columns):
            warnings.warn(f"{path}: no image_id/key columns: no exemplars shown", stacklevel=2)
            return {}
        by_source_key = {r.key: f"{r.split}:{r.image_id}" for r in self.records}
        return {
            int(i): by_source_key[k]
            for i, k in zip(images.image_id, images.key, strict=True)
            if k in by_source_key
        }

    def _read_exemplars(self, stats: Path):
        import pandas as pd

        top = pd.read_parquet(
            stats / "top_examples.parquet", columns=["feature", "rank", "image_id"]
        )
        top = top.sort_values(["feature", "rank"])
        exemplars: dict[int, list[int]] = {}
        for f, ids in top.groupby("feature", sort=False)["image_id"]:
            exemplars[int(f)] = [int(i) for i in ids]
        path = stats / "heatmaps.parquet"
        return exemplars, (HeatMaps.read(path) if path.exists() else HeatMaps.empty())

    def _read_labels(self, stats: Path, report: str | None) -> dict[int, list[dict]]:
        """feature -> its best label associations on the stats' report split (AUROC at the
        patch level where the label has patches, else at the image level)."""
        import pandas as pd

        path = stats / "feature_labels.parquet"
        if not path.exists():
            return {}
        fl = pd.read_parquet(path)
        if "split" in fl and report is not None:
            fl = fl[fl["split"] == report]
        patch = fl["n_pos"] > 0 if "n_pos" in fl else pd.Series(True, index=fl.index)
        image = fl["image_auroc"] if "image_auroc" in fl else fl["auroc"]
        fl = fl.assign(
            score=np.where(patch, fl["auroc"], image), level=np.where(patch, "patch", "image")
        ).dropna(subset=["score"])
        fl = fl.sort_values(["feature", "score"], ascending=[True, False])
        out: dict[int, list[dict]] = {}
        for f, g in fl.groupby("feature", sort=False):
            out[int(f)] = [
                {
                    "label": str(r.label),
                    "auroc": round(float(r.score), 4),
                    "label_auroc_level": str(r.level),
                }  # fmt: skip
                for r in g.head(self.cfg.n_labels).itertuples()
            ]
        return out

    # -- images --------------------------------------------------------------------------------

    def _open(self, key: str) -> tuple[Any, Any]:
        from saev_core.data.images import BadImage, open_image

        data = self._uploads.get(key)
        if data is not None:
            return self._decode_upload(data), None
        record = self.by_key.get(key)
        if record is None:
            raise ExploreError(
                404, f"unknown image {key!r} (keys look like 'test:17' or 'upload:…')"
            )
        try:
            return open_image(record), record
        except BadImage as e:
            raise ExploreError(
                400, f"image {key} ({record.path}) cannot be opened: {e.reason}"
            ) from None

    def state(self, key: str, image: Any = None) -> _ImageState:
        """The image's cached residual stream, codes and unedited predictions (computed once;
        `image`: the key's picture, already decoded)."""
        import torch

        from saev_core.backbone.hooks import record_blocks

        with self.lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
            if image is None:
                image, record = self._open(key)
            else:
                record = self.by_key.get(key)
            st = _ImageState(record)
            shared = self._shared is not None
            for task, reader in self.readers.items():
                if shared and task != "classification":
                    continue  # filled by the classifier's forward
                try:
                    pixels = reader.preprocess([image])
                except Exception as e:  # the processor refuses this picture
                    raise ExploreError(
                        400, f"image {key}: the processor refuses it ({e})"
                    ) from None
                forward = self._shared if shared else reader.forward
                with torch.inference_mode(), record_blocks(reader.blocks, [self.layer]) as acts:
                    out = forward(pixels)
                resid = acts[self.layer].float().clone()
                for t, probs in out.items() if shared else [(task, out)]:
                    st.tasks[t] = _TaskState(pixels, resid, probs.float()[0].cpu().numpy())
            resid = next(iter(st.tasks.values())).resid
            with torch.inference_mode():
                from scipy import sparse

                st.codes = sparse.csr_matrix(self.sae.encode(resid[0]).float().cpu().numpy())
            seg = self.readers.get("segmentation")
            if seg is not None and record is not None and record.mask_path is not None:
                from saev_core.data.images import BadImage
                from saev_core.probes import patch_targets

                lay = seg.layout
                try:
                    geometry = lay.geometry or lay.image_size  # as hypotheses.Cache.evalset
                    st.truth = patch_targets(record, seg.labels, lay.grid, geometry).tolist()
                except (ValueError, BadImage) as e:  # a mask the probe cannot read
                    print(f"saev explore: {key}: no true segmentation ({e})", file=sys.stderr)
            st.png = self._view_png(image)
            self._states[key] = st
            while len(self._states) > self.cfg.max_cached_images:
                self._states.popitem(last=False)
            return st

    def png(self, key: str) -> bytes:
        """The image as the model sees it (`_view_png`). Needs no forward: the page asks for
        every exemplar's thumbnail, which must neither cost a forward each nor push the image
        being edited out of the state cache."""
        with self.lock:
            if key in self._states:
                return self._states[key].png
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        image, _ = self._open(key)
        data = self._view_png(image)
        with self.lock:
            self._pngs[key] = data
            while len(self._pngs) > MAX_PNGS:
                self._pngs.popitem(last=False)
        return data

    def _view_png(self, image: Any) -> bytes:
        """`image` resized and cropped by the processor's geometry, cut to the area the patch
        grid covers, as PNG."""
        from PIL import Image

        lay = self.layout
        h, w = lay.image_size
        im = image.convert("RGB")
        im = lay.geometry.view(im) if lay.geometry is not None else im.resize((w, h))
        gh, gw = lay.grid
        ph, pw = h // gh, w // gw
        im = im.crop((0, 0, gw * pw, gh * ph))
        if im.size != (gw * pw, gh * ph):
            im = im.resize((gw * pw, gh * ph), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    @staticmethod
    def _decode_upload(data: bytes) -> Any:
        from saev_core.data.images import BadImage, ImageRecord, read_image

        record = ImageRecord(0, "upload", "upload", "<upload>", (), source=_Bytes(data))
        try:
            return read_image(record, max_pixels=UPLOAD_MAX_PIXELS)[0]
        except BadImage as e:
            raise ExploreError(400, f"bad image: {e.reason}") from None

    def upload(self, data: bytes) -> str:
        """Decode an uploaded image with extraction's safe opener; returns its key. Its bytes
        are kept (at most `MAX_UPLOADS`), not the decoded picture."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise ExploreError(413, f"upload of {len(data)} bytes is over the {_mib()} limit")
        key = "upload:" + hashlib.sha256(data).hexdigest()[:16]
        with self.lock:
            if key in self._uploads:
                self._uploads.move_to_end(key)
                return key
        image = self._decode_upload(data)
        with self.lock:
            self._uploads[key] = data
            while len(self._uploads) > MAX_UPLOADS:
                old, _ = self._uploads.popitem(last=False)
                self._states.pop(old, None)
                self._pngs.pop(old, None)
        try:
            # the processor's refusal shows now, not on the first slider move
            self.state(key, image)
        except ExploreError:
            with self.lock:
                self._uploads.pop(key, None)
            raise
        return key

    def images(
        self, split: str | None = None, label: str = "", rand: bool = False, limit: int = 48
    ) -> list[dict[str, Any]]:
        split = split or self.cfg.split
        if split != "all" and split not in self.splits:
            raise ExploreError(400, f"unknown split {split!r}; splits: {self.splits} or 'all'")
        rows = [
            r
            for r in self.records
            if (split == "all" or r.split == split) and (not label or label in r.labels)
        ]
        limit = max(0, int(limit))
        rows = random.sample(rows, min(limit, len(rows))) if rand else rows[:limit]
        return [
            {
                "key": f"{r.split}:{r.image_id}",
                "split": r.split,
                "image_id": r.image_id,
                "labels": list(r.labels),
            }  # fmt: skip
            for r in rows
        ]

    def class_examples(self, name: str, limit: int = 8) -> list[dict[str, str]]:
        known = set(self.classes()) | set(self.seg_classes()) | self.image_labels()
        if name not in known:
            raise ExploreError(404, f"unknown class {name!r}")
        # the run's split first
        order = sorted(self.records, key=lambda r: r.split != self.cfg.split)
        hits = [r for r in order if name in r.labels or name == "background"][: max(0, limit)]
        return [{"key": (k := f"{r.split}:{r.image_id}"), "url": _url(k)} for r in hits]

    # -- run facts -----------------------------------------------------------------------------

    def classes(self) -> list[str]:
        r = self.readers.get("classification")
        return list(r.labels) if r is not None else []

    def seg_classes(self) -> list[str]:
        r = self.readers.get("segmentation")
        return list(r.labels) if r is not None else []

    def image_labels(self) -> set[str]:
        return {lab for r in self.records for lab in r.labels}

    def info(self) -> dict[str, Any]:
        lay = self.layout
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.split] = counts.get(r.split, 0) + 1
        return {
            "run": self.run,
            "tasks": list(self.readers),
            "classes": self.classes(),
            "seg_classes": self.seg_classes(),
            "grid": list(lay.grid),
            "patch_size": lay.image_size[0] // lay.grid[0],
            "image_size": list(lay.image_size),
            "splits": self.splits,
            "n_images": counts,
            "d_sae": self.d_sae,
            "layer": self.layer,
            "browser_url": "/browser" if self.browser.exists() else None,
            "default_split": self.cfg.split,
            "labels": sorted(self.image_labels()),
        }

    # -- features and edits --------------------------------------------------------------------

    def _patches(self, patches: Sequence[int]) -> np.ndarray:
        n = self.layout.n_patches
        p = np.asarray(list(patches), dtype=np.int64)
        bad = p[(p < 0) | (p >= n)]
        if len(bad):
            raise ExploreError(400, f"patch {int(bad[0])} is outside the grid (0..{n - 1})")
        return np.unique(p)

    def features(
        self,
        key: str,
        patches: Sequence[int] = (),
        n: int = 12,
        min_freq: float = 0.0,
        max_freq: float = 1.0,
    ) -> list[dict[str, Any]]:
        """The `n` features with the largest code summed over `patches` (empty = all), among
        those whose firing frequency is in [min_freq, max_freq]."""
        if not 0 <= min_freq <= max_freq:
            raise ExploreError(400, f"need 0 <= min_freq <= max_freq, got {min_freq}, {max_freq}")
        st = self.state(key)
        p = self._patches(patches)
        codes = st.codes[self.layout.n_prefix_tokens :]  # [P, d_sae]
        value = np.asarray((codes[p] if len(p) else codes).sum(0)).ravel()
        ok = (value > 0) & (self.freq >= min_freq) & (self.freq <= max_freq)
        order = [int(f) for f in np.argsort(-value, kind="stable") if ok[f]][: max(0, int(n))]
        return [self._feature(f, float(value[f]), codes[:, f].toarray().ravel()) for f in order]

    def _feature(self, f: int, value: float, per_patch: np.ndarray) -> dict[str, Any]:
        exemplars = []
        for image_id in self._exemplars.get(f, [])[: self.cfg.n_exemplars]:
            key = self._shard_keys.get(image_id)
            if key is not None:
                exemplars.append(
                    {"key": key, "url": _url(key), "heat": self._heat.get((f, image_id))}
                )
        return {
            "feature": f,
            "value": round(value, 6),
            "max_act": float(self.max_act[f]),
            "frequency": float(self.freq[f]),
            "labels": self._labels.get(f, []),
            "per_patch": [round(float(v), 5) for v in per_patch],
            "exemplars": exemplars,
            "browser_url": f"/browser#feature={f}" if self.browser.exists() else None,
        }

    def edit_of(
        self, edits: Sequence[dict[str, Any]], where: str, patches: Sequence[int]
    ) -> tuple[Any, Any]:
        """(FeatureEdit | None, tokens | None): each edited feature clamped to scale x max_act
        on the tokens `where` names (module docstring)."""
        import torch

        from saev_core.intervene.layout import scope_tokens
        from saev_core.intervene.splicing import FeatureEdit

        p = self._patches(patches)  # checked even when nothing is edited yet
        scales: dict[int, float] = {}
        for e in edits:
            f, s = int(e["feature"]), float(e["scale"])
            if not 0 <= f < self.d_sae:
                raise ExploreError(400, f"unknown feature {f}: this SAE has 0..{self.d_sae - 1}")
            if not np.isfinite(s) or abs(s) > 1000:
                raise ExploreError(400, f"feature {f}: scale {s} is not a number in [-1000, 1000]")
            scales[f] = s  # the last edit of a feature wins
        if where not in ("selected", "image"):
            raise ExploreError(400, f"where must be 'selected' or 'image', got {where!r}")
        if not scales:
            return None, None
        feats = tuple(sorted(scales))
        targets = tuple(scales[f] * float(self.max_act[f]) for f in feats)
        edit = FeatureEdit("clamp", feats, 1.0, targets)
        if where == "image":
            return edit, None
        if not len(p):
            return edit, scope_tokens(self.layout, "patches")
        mask = torch.zeros(self.layout.n_patches, dtype=torch.bool)
        mask[torch.as_tensor(p)] = True
        return edit, scope_tokens(self.layout, "region", mask)

    def forward_all(self, st: _ImageState, edit: Any, tokens: Any) -> dict[str, np.ndarray]:
        """Every task's probabilities with the edit: one forward of the blocks after the SAE's
        when the tasks share it (`_shared_forward`), else one per task."""
        if self._shared is None:
            return {task: self.forward_after(task, st, edit, tokens) for task in self.readers}
        import torch

        from saev_core.intervene.splicing import Splice, splice

        reader, ts = self.readers["classification"], st.tasks["classification"]
        tuple_output = self._tuple_output["classification"]
        with self.lock, torch.inference_mode():
            with resume_after(reader.blocks, self.layer, ts.resid, tuple_output):
                spliced = (
                    splice(reader.blocks, Splice(self.layer, self.sae, edit, tokens))
                    if edit is not None
                    else contextlib.nullcontext()
                )
                with spliced:
                    out = self._shared(ts.pixels)
        return {t: p.float()[0].cpu().numpy() for t, p in out.items()}

    def forward_after(self, task: str, st: _ImageState, edit: Any, tokens: Any) -> np.ndarray:
        """The task's probabilities with the edit, rerunning only the blocks after the SAE's."""
        import torch

        from saev_core.intervene.splicing import Splice, splice

        reader, ts = self.readers[task], st.tasks[task]
        with self.lock, torch.inference_mode():
            with resume_after(reader.blocks, self.layer, ts.resid, self._tuple_output[task]):
                spliced = (
                    splice(reader.blocks, Splice(self.layer, self.sae, edit, tokens))
                    if edit is not None
                    else contextlib.nullcontext()
                )
                with spliced:
                    return reader.forward(ts.pixels).float()[0].cpu().numpy()

    def predict(
        self,
        key: str,
        edits: Sequence[dict[str, Any]] = (),
        where: str = "selected",
        patches: Sequence[int] = (),
        seq: int = 0,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        st = self.state(key)
        edit, tokens = self.edit_of(edits, where, patches)
        out: dict[str, Any] = {"seq": seq, "classification": None, "segmentation": None}
        afters = self.forward_all(st, edit, tokens)
        for task in self.readers:
            after = afters[task]
            before = st.tasks[task].before
            labels = self.readers[task].labels
            if task == "classification":
                out[task] = {
                    "before": _top(labels, before),
                    "after": _top(labels, after),
                    "probs": {
                        "classes": labels,
                        "before": _floats(before),
                        "after": _floats(after),
                    },  # fmt: skip
                }
            else:
                out[task] = {
                    "classes": labels,
                    "before": before.argmax(-1).tolist(),
                    "after": after.argmax(-1).tolist(),
                    "truth": st.truth,
                }
        out["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out


# ---------------------------------------------------------------------------------------------
# helpers


def _top(labels: list[str], p: np.ndarray, n: int = TOP_CLASSES) -> list[dict[str, Any]]:
    order = np.argsort(-p, kind="stable")[:n]
    return [{"class": labels[i], "prob": float(p[i])} for i in order]


def _floats(p: np.ndarray) -> list[float]:
    return [float(v) for v in p]


def _url(key: str) -> str:
    return f"/api/image/{key}.png"


def _mib() -> str:
    return f"{MAX_UPLOAD_BYTES / 2**20:g} MiB"
