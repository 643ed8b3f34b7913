"""`saev explore`: an interactive app over one run (patches -> features -> sliders -> prediction).

The back end of the page `explore.html` (next to this module): a FastAPI app over one run, i.e.
a backbone, the SAE at its layer, its stats, and what reads the model (the classifier's own head
or, for a backbone without one, a classification probe; and a segmentation probe when there is
one). Everything goes through the code the intervene stage uses: `hypotheses.load_reader` for
the model and its head or probe, `intervene.splice` for the edit (through the SAE with its error
term, so an unedited image gives the plain forward), the stats Parquet for max activations,
frequencies, exemplars, heat maps and label AUROCs.

Fast path. When an image is first shown, one plain forward records the residual stream after
the SAE's block (`backbone.record_blocks`), the unedited prediction and the SAE codes. An edit
then reruns only what follows the block: inside `resume_after`, the blocks up to the SAE's one
return at once (the earlier ones pass their input through, the SAE's block returns the cached
residual stream), the splice's hook edits that output as in any other forward, and the later
blocks, the final norm and the head or probe run as usual. Generic over models: nothing here
knows where a model keeps its final norm or head. When the segmentation probe reads the
classifier's own backbone (the same weights: the demo run), one forward serves both tasks: the
classifier's, its `base_model`'s last hidden state caught on the way for the probe (checked at
start-up against the probe's own forward, else each task runs its own model).

Memory: at most `max_cached_images` image states (residual stream, sparse codes, the PNG view;
not the decoded picture), `MAX_UPLOADS` uploads (their bytes), `MAX_PNGS` served views. A PNG
(an exemplar thumbnail) needs no forward and takes no place in the state cache. Every forward
runs under one lock (`resume_after` patches the blocks in place; uvicorn runs the endpoints in
a thread pool).

API (the contract with the page; /tmp/brief/explore_api.md, this copy is authoritative):

    GET  /                   the page (a placeholder until explore.html exists)
    GET  /browser            the stats run's static browser.html (404 when it was not written)
    GET  /api/info           {run, tasks, classes, seg_classes, grid, patch_size, image_size,
                              splits, n_images, d_sae, layer, browser_url, default_split, labels}
    GET  /api/images?split=&label=&random=0&limit=48     [{key, split, image_id, labels}]
    GET  /api/image/{key}.png                             the image as the model sees it
    POST /api/upload         multipart field "file" (or the raw bytes as the body) -> {key}
    POST /api/features       {image, patches, n, min_freq, max_freq} -> {features: [...]}
    POST /api/predict        {image, edits, where, patches, seq} -> {seq, ms, classification,
                              segmentation}
    GET  /api/class/{name}/examples?limit=8               [{key, url}]
    POST /api/log            the predict body -> {run_id, experiment_id, url}

Details the contract leaves open, decided here:
- `split` of /api/images: default the run's split (`intervene.split`); "all" lists every split.
- `where: "image"` edits every token (CLS and registers too: intervene's scope "all");
  `where: "selected"` with no patch selected edits every patch (intervene's scope "patches").
- An edit sets the feature's code to `scale x max_act` (intervene's relative clamp); a feature
  whose max_act is 0 (never fired in the stats) cannot be moved that way.
- classification `before`/`after` are each the top 5 of their own probabilities; `probs`
  ({classes, before, after}, every class) is added so the page can show any class's change.
- /api/info adds `default_split` and `labels` (every image label, for the label picker);
  /api/features adds `label_auroc_level` per label ("patch" or "image").
- Errors are 4xx with {"detail": reason}: 400 bad request (unknown feature, patch out of range,
  undecodable upload), 404 unknown image or class, 413 upload over 4 MiB, 422 a malformed body
  (FastAPI's validation), 503 /api/log when no tracker is configured.

`saev_core` imports no MLflow: /api/log calls the `log_run(record) -> dict` callback given to
`create_app` (flows/explore.py passes an MLflow one).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoints' annotations here
from pydantic import BaseModel, Field

PAGE = Path(__file__).with_name("explore.html")
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


# ---------------------------------------------------------------------------------------------
# the fast path


@contextlib.contextmanager
def resume_after(blocks: Any, layer: int, x: Any, tuple_output: bool = False) -> Iterator[None]:
    """Within the block, a forward of the model skips its blocks 0..layer: blocks before
    `layer` return their input, block `layer` returns `x` (its cached output, [1, T, D] or
    [B, T, D]); hooks on block `layer` (a splice) still see and edit that output, and the later
    blocks run as usual. The embeddings still run (cheap) and are discarded."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_output else h

    def cached(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = x.to(h.dtype).expand(h.shape[0], *x.shape[1:])
        return (out,) if tuple_output else out

    patched = []
    try:
        for i in range(layer + 1):
            blocks[i].forward = cached if i == layer else passthrough
            patched.append(blocks[i])
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward


def returns_tuple(blocks: Any, layer: int, forward: Any, image_size: Any, device: str) -> bool:
    """Whether block `layer` returns a tuple (older transformers) rather than a tensor (5.x),
    seen in one forward of a blank image; `resume_after` must return the same."""
    import torch

    seen = {}

    def hook(module, args, output):
        seen["tuple"] = isinstance(output, (tuple, list))

    handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            forward(torch.zeros(1, 3, *image_size, device=device))
    finally:
        handle.remove()
    return bool(seen.get("tuple", False))


@dataclass
class _TaskState:
    pixels: Any
    resid: Any
    """The residual stream after the SAE's block, [1, T, D] float."""
    before: np.ndarray
    """Unedited probabilities: [C] (classification) or [P, C] (segmentation)."""


@dataclass
class _ImageState:
    record: Any
    tasks: dict[str, _TaskState] = field(default_factory=dict)
    codes: Any = None
    """SAE codes of every token [T, d_sae], sparse (CSR): a ViT-B's dense 197 x 24,576 codes
    would hold 19 MB per image."""
    png: bytes = b""
    """The image as the model sees it (`Explorer._view_png`); the decoded picture itself, up to
    16 MP for an upload, is not kept."""
    truth: list[int] | None = None


class _Bytes:
    """An upload's bytes, where `data.read_image` looks for a record's source."""

    def __init__(self, data: bytes):
        self.data = data

    def image_file(self, key: str) -> bytes:
        return self.data


# ---------------------------------------------------------------------------------------------
# the run


class HeatMaps:
    """The stats' heat maps as one float32 `[rows, patches]` array and a (feature, image_id) ->
    row index: 24,576 features x 16 exemplars x 196 patches are 300 MB as float32, several GB as
    Python float lists; `get` converts only the row a response needs."""

    def __init__(self, values_rp: np.ndarray, index: dict[tuple[int, int], int]) -> None:
        self.values_rp, self.index = values_rp, index

    @classmethod
    def empty(cls) -> HeatMaps:
        return cls(np.zeros((0, 0), np.float32), {})

    @classmethod
    def read(cls, path: Path) -> HeatMaps:
        """heatmaps.parquet (`feature`, `image_id`, `values`: one list of patch values a row)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["feature", "image_id", "values"])
        values = t.column("values").combine_chunks()
        lengths = np.unique(pc.list_value_length(values).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise ValueError(f"{path}: heat maps of unequal lengths {lengths.tolist()[:5]}")
        n = int(lengths[0]) if len(lengths) else 0
        flat = values.flatten().to_numpy(zero_copy_only=False)  # nulls -> NaN
        arr = np.asarray(flat, np.float32).reshape(len(t), n)
        feature = t.column("feature").to_numpy().astype(np.int64)
        image_id = t.column("image_id").to_numpy().astype(np.int64)
        pairs = zip(feature.tolist(), image_id.tolist(), strict=True)
        return cls(arr, {fi: r for r, fi in enumerate(pairs)})

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: tuple[int, int]) -> list[float | None] | None:
        """The heat map of (feature, image_id) as a JSON list (4 decimals, None for no value)."""
        r = self.index.get((int(key[0]), int(key[1])))
        if r is None:
            return None
        row = self.values_rp[r].astype(np.float64).round(4)
        return [None if v != v else float(v) for v in row]


class Explorer:
    """One run, loaded once: readers, SAE, stats tables, image records; images on demand."""

    def __init__(self, cfg: ExploreConfig):
        import pandas as pd

        from saev_core.backbone import resolve_layer
        from saev_core.data import SPLITS, load_records
        from saev_core.hypotheses import Cache, Settings, _stats_splits, stats_run

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
        from saev_core.hypotheses import Hypothesis, load_reader

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
        from saev_core.data import BadImage, open_image

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

        from saev_core.backbone import record_blocks

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
                from saev_core.data import BadImage
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
        from saev_core.data import BadImage, ImageRecord, read_image

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

        from saev_core.intervene import FeatureEdit, scope_tokens

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

        from saev_core.intervene import Splice, splice

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

        from saev_core.intervene import Splice, splice

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


# ---------------------------------------------------------------------------------------------
# the app


PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>saev explore</title>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>saev explore</h1><p>The page (saev_core/explore.html) is not installed; the API is up:
<a href="/api/info">/api/info</a>.</p></body>"""


class Edit(BaseModel):
    """One slider: the feature's code becomes scale x its max_act."""

    feature: int
    scale: float


class FeaturesBody(BaseModel):
    image: str
    patches: list[int] = Field(default_factory=list)
    n: int = Field(12, ge=0, le=200)
    min_freq: float = 0.0
    max_freq: float = 1.0


class PredictBody(BaseModel):
    image: str
    edits: list[Edit] = Field(default_factory=list)
    where: Literal["selected", "image"] = "selected"
    patches: list[int] = Field(default_factory=list)
    seq: int = 0


def allowed_hosts(hosts: Sequence[str] = ()) -> list[str]:
    """Host header names the app answers to: the loopback names plus `hosts` (the --host it
    listens on; for 0.0.0.0 / :: this machine's names too). IPv6 literals come bracketed, as
    in a Host header. Anything else is refused (400): a DNS-rebinding page's requests carry
    its own domain as Host."""
    import socket

    names = list(LOOPBACK)
    for h in hosts:
        names.append(h)
        if h in ("0.0.0.0", "::", ""):
            names += [socket.gethostname(), socket.getfqdn()]
    return sorted({f"[{h}]" if ":" in h else h.lower() for h in names if h})


SAME_SITE = ("same-origin", "none")
"Sec-Fetch-Site values a POST may carry: the page itself, or the user (curl, address bar)."


def create_app(
    ex: Explorer,
    log_run: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    hosts: Sequence[str] = (),
):
    """The FastAPI app over `ex`; `log_run(record)` makes /api/log record an intervention.

    Only Host names of `allowed_hosts(hosts)` are served (against DNS rebinding; tests pass
    TestClient's "testserver"), and a POST from another site (`Sec-Fetch-Site` cross-site or
    same-site, or an `Origin` other than this Host) is refused (403): a page elsewhere cannot
    upload, predict or log through the user's browser.
    """
    from urllib.parse import urlsplit

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="saev explore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def same_origin_posts(request: Request, call_next):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            site = request.headers.get("sec-fetch-site")
            origin = request.headers.get("origin")
            if site is not None and site not in SAME_SITE:
                return JSONResponse({"detail": f"cross-site request refused ({site})"}, 403)
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse({"detail": f"request from origin {origin} refused"}, 403)
        return await call_next(request)

    # added last: runs first, so a foreign Host is refused before anything else
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(hosts))

    @app.exception_handler(ExploreError)
    async def refused(request: Request, e: ExploreError):
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text() if PAGE.is_file() else PLACEHOLDER)

    @app.get("/browser")
    def browser():
        if not ex.browser.is_file():
            raise ExploreError(404, f"{ex.browser} was not written (stats.browser.enabled)")
        return FileResponse(ex.browser, media_type="text/html")

    @app.get("/api/info")
    def info():
        return ex.info()

    @app.get("/api/images")
    def images(split: str | None = None, label: str = "", random: int = 0, limit: int = 48):
        return ex.images(split, label, bool(random), min(max(limit, 0), 1000))

    @app.get("/api/image/{key}.png")
    def image(key: str):
        return Response(ex.png(key), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})  # fmt: skip

    @app.post("/api/upload")
    async def upload(request: Request):
        data = await _upload_bytes(request)
        return {"key": await run_in_threadpool(ex.upload, data)}  # decoding: off the loop

    @app.post("/api/features")
    def features(body: FeaturesBody):
        return {
            "features": ex.features(body.image, body.patches, body.n, body.min_freq, body.max_freq)
        }

    def _predict(body: PredictBody) -> dict[str, Any]:
        edits = [e.model_dump() for e in body.edits]
        return ex.predict(body.image, edits, body.where, body.patches, body.seq)

    @app.post("/api/predict")
    def predict(body: PredictBody):
        return _predict(body)

    @app.get("/api/class/{name}/examples")
    def class_examples(name: str, limit: int = 8):
        return ex.class_examples(name, min(max(limit, 0), 200))

    @app.post("/api/log")
    def log(body: PredictBody):
        if log_run is None:
            raise ExploreError(503, "no tracker configured (saev explore logs to MLflow)")
        result = _predict(body)
        record = {
            "run": ex.run,
            "sae_dir": ex.cfg.sae_dir,
            "stats_dir": ex.cfg.stats_dir,
            "model": ex.cfg.model,
            "layer": ex.layer,
            "image": body.image,
            "edits": [e.model_dump() for e in body.edits],
            "where": body.where,
            "patches": body.patches,
            "max_act": {str(e.feature): float(ex.max_act[e.feature]) for e in body.edits},
            "prediction": result,
        }
        return log_run(record)

    return app


async def _upload_bytes(request: Request) -> bytes:
    """The uploaded file's bytes: multipart/form-data field "file" (parsed with the standard
    library's email parser: python-multipart is not installed), or the raw body. Anything over
    the limit is refused (413) before it is read whole."""
    limit = MAX_UPLOAD_BYTES + 64 * 1024  # room for the multipart headers
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ExploreError(413, f"upload of {declared} bytes is over the {_mib()} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ExploreError(413, f"upload is over the {_mib()} limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        if not ctype.startswith("image/"):  # a form or text/plain: what a cross-site form sends
            raise ExploreError(415, f"upload Content-Type {ctype or '(none)'!r}: send "
                               "multipart/form-data (field 'file') or image/*")  # fmt: skip
        if not body:
            raise ExploreError(400, "empty upload: send the image as multipart field 'file'")
        return body
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise ExploreError(400, "malformed multipart body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            data = part.get_payload(decode=True) or b""
            if len(data) > MAX_UPLOAD_BYTES:
                raise ExploreError(413, f"upload of {len(data)} bytes is over the {_mib()} limit")
            if not data:
                raise ExploreError(400, "bad image: empty file (0 bytes)")
            return data
    raise ExploreError(400, "no multipart field 'file' in the upload")


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


def resolve_config(args: Any) -> ExploreConfig:
    """The run named on the command line, the rest from the params file's `intervene`, `probe`
    and `extract` sections (a missing params file leaves the built-in defaults)."""
    from saev_core.config import load_section
    from saev_core.intervene import InterveneConfig
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
