"""A static, self-contained HTML feature browser for one stats run, and PNG exemplar grids.

`build_browser` reads a stats directory (`saev_core.stats.tables.write_stats`) and the images its shard
set lists, and writes one HTML file holding everything: the data as JSON, the exemplar thumbnails
as JPEG data URIs, and the page's CSS and JavaScript (`browser.html` next to this module). Opening
the file needs no server and no network. The page lists every feature with search (a feature id,
or a label its best association or exemplars carry) and sorting (frequency, AUROC, breadth), and
shows one feature at a time: its top exemplar images with the patch activations as a heat map,
its activation histogram, label associations and decoder neighbours. `#feature=12` in the URL
opens feature 12.

Labels are scored at the level the source gives them: patch AUROC for labels some patch carries
(masks), image AUROC for labels only whole images carry (class folders), so a class-folder run
names its features too. A feature's best label is shown only at or above `min_auroc`.

`exemplar_grid` renders the same exemplars and heat maps as one PNG (features as rows), the
picture the stats flow logs to MLflow.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TEMPLATE = Path(__file__).with_name("browser.html")


@dataclass(frozen=True)
class BrowserConfig:
    """`stats.browser` in params.yaml: whether to write the browser, and how much it embeds."""

    enabled: bool = True
    """Write `browser.html` and `exemplars.png` next to the stats tables."""
    n_exemplars: int = 6
    """Exemplar images shown per feature (at most the stats' n_top)."""
    thumb_px: int = 64
    """Longest side of each embedded thumbnail, in pixels."""
    max_features: int | None = None
    """Embed only the most frequent features (None: all)."""
    n_labels: int = 5
    """Label associations listed per feature (best AUROC first)."""
    min_auroc: float = 0.7
    """A feature's best label is shown only when its AUROC reaches this floor (else "no label");
    the search by label uses the same floor. 0.5 is chance: below 0.7 a label explains little."""

    def __post_init__(self) -> None:
        if self.n_exemplars < 1:
            raise ValueError(f"browser.n_exemplars must be >= 1, got {self.n_exemplars}")
        if self.thumb_px < 8:
            raise ValueError(f"browser.thumb_px must be >= 8, got {self.thumb_px}")
        if self.max_features is not None and self.max_features < 1:
            raise ValueError(f"browser.max_features must be >= 1 or null, got {self.max_features}")
        if self.n_labels < 0:
            raise ValueError(f"browser.n_labels must be >= 0, got {self.n_labels}")
        if not 0 <= self.min_auroc <= 1:
            raise ValueError(f"browser.min_auroc must be in [0, 1], got {self.min_auroc}")


def _read(stats_dir: Path, name: str) -> pd.DataFrame | None:
    path = stats_dir / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _images(run: pd.Series, root: Path) -> pd.DataFrame:
    """The shard set's image table (image_id, path, labels), or an empty one."""
    shard_dir = Path(str(run.get("shard_dir") or ""))
    path = (shard_dir if shard_dir.is_absolute() else root / shard_dir) / "images.parquet"
    if not shard_dir.parts or not path.exists():
        return pd.DataFrame({"image_id": [], "path": [], "labels": []})
    return pd.read_parquet(path, columns=["image_id", "path", "labels"])


def _geometry(run: pd.Series, root: Path):
    """The processor's resize and crop from the manifest of the run's shard set, or None (a set
    from before it was recorded, or no shard set found: thumbnails then show the whole image)."""
    from saev_core.geometry import Geometry

    shard_dir = Path(str(run.get("shard_dir") or ""))
    path = (shard_dir if shard_dir.is_absolute() else root / shard_dir) / "manifest.json"
    if not shard_dir.parts or not path.exists():
        return None
    recorded = json.loads(path.read_text()).get("geometry")
    return None if recorded is None else Geometry.from_dict(recorded, f"{path}: geometry")


def _thumb(path: Path, px: int, geometry=None, grid: tuple[int, int] = (0, 0)):
    """A thumbnail of at most px x px: with a geometry, of the image as the model sees it
    (resized, centre-cropped, cut to the area the patch grid covers) so heat maps line up.
    Decoded as extraction decodes it (EXIF orientation, CMYK through its ICC profile, 16-bit
    grey scaled), so it is the picture the model saw; None for a file that no longer opens."""
    from saev_core.data.images import BadImage, ImageRecord, open_image

    try:
        im = open_image(ImageRecord(0, "", str(path), path, ()))
    except BadImage:
        return None
    if geometry is not None:
        im = geometry.view(im)
        rows, cols = grid
        if rows and cols:  # an input side that is not a multiple of the patch: drop the rest
            w, h = im.size
            im = im.crop((0, 0, cols * (w // cols), rows * (h // rows)))
    im.thumbnail((px, px))
    return im


def _data_uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def browser_data(stats_dir: str | Path, root: str | Path = ".", cfg: BrowserConfig | None = None):
    """Everything the page shows, as one JSON-able dict (see browser.html for its use)."""
    cfg = cfg or BrowserConfig()
    stats_dir, root = Path(stats_dir), Path(root)
    run = _read(stats_dir, "run")
    features = _read(stats_dir, "features")
    if run is None or features is None:
        raise FileNotFoundError(f"{stats_dir}: not a stats directory (no run/features.parquet)")
    run_row = run.iloc[0]
    top = _read(stats_dir, "top_examples")
    labels = _read(stats_dir, "feature_labels")
    # A feature's labels are ranked on the select split and shown with the report split's scores
    # (choosing the best label on the split it reports would flatter it).
    select_labels = None
    if labels is not None and "split" in labels:
        report_split, select_split = run_row.get("report_split"), run_row.get("select_split")
        if isinstance(report_split, str) and report_split:
            if isinstance(select_split, str) and select_split:
                select_labels = labels[labels["split"] == select_split]
            labels = labels[labels["split"] == report_split]
            # precision and recall at the threshold chosen on the select split, not the report
            # split's own best-F1 threshold (an oracle on the split it reports)
            fixed = {c: f"{c}_at_select" for c in ("precision", "recall", "image_precision",
                                                    "image_recall")}  # fmt: skip
            if all(v in labels for v in fixed.values()):
                labels = labels.assign(**{k: labels[v] for k, v in fixed.items()})
    neighbors = _read(stats_dir, "neighbors")
    heatmaps = _read(stats_dir, "heatmaps")
    features = features.sort_values("feature")
    if cfg.max_features is not None and cfg.max_features < len(features):
        keep = features.nlargest(cfg.max_features, "freq", keep="first")["feature"]
        features = features[features.feature.isin(keep)]
    keep_ids = set(features.feature.tolist())

    images = _images(run_row, root)
    labels_of = dict(zip(images.image_id, images["labels"].map(_as_list), strict=True))
    path_of = dict(zip(images.image_id, images.path, strict=True))
    heat_of: dict[tuple[int, int], np.ndarray] = {}
    if heatmaps is not None:
        for f, r, v in zip(heatmaps.feature, heatmaps["rank"], heatmaps["values"], strict=True):
            heat_of[(int(f), int(r))] = np.asarray(v, dtype=np.float64)

    ex_by: dict[int, list[dict]] = {}
    if top is not None:
        top = top[(top["rank"] <= cfg.n_exemplars) & top.feature.isin(keep_ids)]
        for row in top.sort_values(["feature", "rank"]).itertuples(index=False):
            ex_by.setdefault(int(row.feature), []).append(
                {"image": int(row.image_id), "rank": int(row.rank), "value": float(row.value),
                 "token": int(row.token)}
            )  # fmt: skip
    assoc_by: dict[int, list[list]] = {}
    level_of: dict[str, str] = {}
    if labels is not None and len(labels):
        labels, level_of = _scored(labels[labels.feature.isin(keep_ids)])
        labels["rank_score"] = labels["score"]
        if select_labels is not None and len(select_labels):
            chosen, _ = _scored(select_labels[select_labels.feature.isin(keep_ids)])
            by = chosen.set_index(["feature", "label"])["score"]
            labels["rank_score"] = by.reindex(
                pd.MultiIndex.from_frame(labels[["feature", "label"]])
            ).to_numpy()
        ranked = labels.sort_values(
            ["feature", "rank_score", "label"], ascending=[True, False, True], na_position="last"
        )
        for f, group in ranked.groupby("feature", sort=False):
            assoc_by[int(f)] = [
                [str(r.label), _num(r.score), _num(r.auroc), _num(r.image_auroc),
                 _num(r.lv_precision), _num(r.lv_recall), _num(r.lv_mean_in),
                 _num(r.lv_mean_out), str(r.level), _num(r.rank_score)]
                for r in group.head(cfg.n_labels).itertuples(index=False)
            ]  # fmt: skip
    nb_by: dict[int, list[list]] = {}
    if neighbors is not None:
        for f, n, c in zip(neighbors.feature, neighbors.neighbor, neighbors.cosine, strict=True):
            nb_by.setdefault(int(f), []).append([int(n), round(float(c), 3)])

    n_prefix = int(run_row.get("n_prefix_tokens") or 0)
    rows = []
    used_images: set[int] = set()
    for feat in features.itertuples(index=False):
        f = int(feat.feature)
        ex = ex_by.get(f, [])
        mx = float(feat.max_act) if feat.max_act and feat.max_act > 0 else 1.0
        for e in ex:
            used_images.add(e["image"])
            heat = heat_of.get((f, e["rank"]))
            if heat is not None:
                # the feature's code on each patch as 0..255 of its largest value
                q = np.nan_to_num(np.clip(heat / mx, 0, 1) * 255).round().astype(np.uint8)
                e["heat"] = base64.b64encode(q.tobytes()).decode()
            e["patch"] = e.pop("token") - n_prefix
        ex_labels = [labels_of.get(e["image"], []) for e in ex]
        spanned = sorted({x for ls in ex_labels for x in ls})
        top_label = (
            max(spanned, key=lambda x: sum(x in ls for ls in ex_labels)) if spanned else None
        )
        assoc = assoc_by.get(f, [])
        rows.append(
            {
                "id": f,
                "freq": _num(feat.freq),
                "freq_images": _num(feat.freq_images),
                "freq_cls": _num(feat.freq_cls),
                "freq_patches": _num(feat.freq_patches),
                "mean": _num(feat.mean_act),
                "max": _num(feat.max_act),
                "hist": [int(x) for x in feat.hist],
                "spread": _num(getattr(feat, "spatial_entropy", None)),
                # the best label on the select split, unless even it is below the floor there:
                # then "no label"; its AUROC shown is the report split's
                "best": (
                    assoc[0][0]
                    if assoc and assoc[0][9] is not None and assoc[0][9] >= cfg.min_auroc
                    else None
                ),
                "auroc": assoc[0][1] if assoc else None,
                "level": assoc[0][8] if assoc else None,
                "breadth": len(spanned),
                "ex_label": top_label,
                "labels": assoc,
                "neighbors": nb_by.get(f, []),
                "ex": ex,
            }
        )
    thumbs = {}
    grid = [int(run_row.get("grid_rows") or 0), int(run_row.get("grid_cols") or 0)]
    geometry = _geometry(run_row, root) if used_images else None
    for image_id in sorted(used_images):
        path = path_of.get(image_id)
        if path is None:
            continue
        p = Path(path) if Path(path).is_absolute() else root / path
        thumb = _thumb(p, cfg.thumb_px, geometry, tuple(grid)) if p.exists() else None
        if thumb is not None:
            thumbs[str(image_id)] = _data_uri(thumb)
    return {
        "run": str(run_row["run"]),
        "backbone": str(run_row.get("backbone") or ""),
        "layer": None if pd.isna(run_row.get("layer")) else int(run_row["layer"]),
        "d_sae": int(run_row.get("d_sae") or len(features)),
        "n_tokens": int(run_row.get("n_tokens") or 0),
        "n_images": int(run_row.get("n_images") or 0),
        "grid": grid,
        "min_auroc": cfg.min_auroc,
        # which AUROC names a feature: "patch" (masks), "image" (image labels only) or "mixed"
        "label_level": _one_level(level_of),
        "hist_edges": [float(x) for x in run_row["hist_edges"]],
        "features": rows,
        "images": thumbs,
        "image_labels": {str(i): labels_of.get(i, []) for i in sorted(used_images)},
    }


def build_browser(
    stats_dir: str | Path,
    out_path: str | Path,
    root: str | Path = ".",
    cfg: BrowserConfig | None = None,
) -> Path:
    """Write the self-contained HTML browser of one stats run to `out_path` (atomically)."""
    data = browser_data(stats_dir, root, cfg)
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    # the JSON sits inside a <script> element: "</" must not close it early
    payload = payload.replace("</", "<\\/")
    html = TEMPLATE.read_text().replace("/*__DATA__*/{}", payload)
    html = html.replace("__TITLE__", f"saev features: {data['run']}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(html)
    tmp.replace(out_path)
    return out_path


def exemplar_grid(
    stats_dir: str | Path,
    features: list[int],
    out_path: str | Path,
    root: str | Path = ".",
    n_exemplars: int = 6,
    tile_px: int = 96,
) -> Path:
    """A PNG with one row per feature: its top exemplars, each with the heat map laid over it
    (the images as the model saw them, resized and cropped by the shard set's geometry)."""
    from PIL import Image, ImageDraw

    cfg = BrowserConfig(n_exemplars=n_exemplars, thumb_px=tile_px)
    data = browser_data(stats_dir, root, cfg)
    by_id = {f["id"]: f for f in data["features"]}
    rows_, cols = data["grid"]
    label_w = 150
    canvas = Image.new(
        "RGB",
        (label_w + n_exemplars * (tile_px + 4), max(len(features), 1) * (tile_px + 4)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for i, f in enumerate(features):
        feat = by_id.get(int(f))
        y = i * (tile_px + 4)
        if feat is None:
            continue
        best = f"{feat['best']} {feat['auroc']:.2f}" if feat["best"] else ""
        draw.text((4, y + 4), f"feature {f}", fill="black")
        draw.text((4, y + 20), best, fill="black")
        draw.text((4, y + 36), f"freq {feat['freq']:.3g}", fill="black")
        for j, e in enumerate(feat["ex"][:n_exemplars]):
            x = label_w + j * (tile_px + 4)
            uri = data["images"].get(str(e["image"]))
            if uri:
                raw = base64.b64decode(uri.split(",", 1)[1])
                tile = Image.open(io.BytesIO(raw)).convert("RGB").resize((tile_px, tile_px))
            else:
                tile = Image.new("RGB", (tile_px, tile_px), (200, 200, 200))
            if "heat" in e and rows_ * cols:
                q = np.frombuffer(base64.b64decode(e["heat"]), np.uint8)[: rows_ * cols]
                alpha = Image.fromarray(q.reshape(rows_, cols)).resize(
                    (tile_px, tile_px), Image.NEAREST
                )
                red = Image.new("RGB", (tile_px, tile_px), (255, 0, 0))
                tile = Image.composite(red, tile, alpha.point(lambda v: int(v * 0.6)))
            canvas.paste(tile, (x, y))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path


def _scored(labels: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """`labels` with each row's AUROC at its label's level, and {label: level}.

    A label that some patch carries (masks) is scored by patch AUROC; a label only images carry
    (class folders, image-level dataset columns) by image AUROC, where an image scores its
    highest patch code. Columns `score`, `level` and `lv_*` (precision, recall and means at that
    level) are added."""
    labels = labels.copy()
    for col in ("image_auroc", "precision", "recall", "image_precision", "image_recall",
                "image_mean_in", "image_mean_out"):  # fmt: skip
        if col not in labels:
            labels[col] = np.nan
    patch_level = labels.groupby("label")["auroc"].transform(lambda a: a.notna().any())
    if "n_pos" in labels:
        patch_level &= labels["n_pos"].fillna(0) > 0
    patch_level = patch_level.astype(bool)
    labels["level"] = np.where(patch_level, "patch", "image")
    for lv, patch_col, image_col in (
        ("score", "auroc", "image_auroc"),
        ("lv_precision", "precision", "image_precision"),
        ("lv_recall", "recall", "image_recall"),
        ("lv_mean_in", "mean_in", "image_mean_in"),
        ("lv_mean_out", "mean_out", "image_mean_out"),
    ):
        labels[lv] = labels[patch_col].where(patch_level, labels[image_col])
    level_of = dict(zip(labels["label"], labels["level"], strict=True))
    return labels, level_of


def _one_level(level_of: dict[str, str]) -> str | None:
    """The level every label is scored at, "mixed" when they differ, None without labels."""
    levels = set(level_of.values())
    return levels.pop() if len(levels) == 1 else ("mixed" if levels else None)


def _as_list(x: Any) -> list[str]:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return []
    return [str(v) for v in x]


def _num(x: Any) -> float | None:
    """A finite float rounded for the page, or None (JSON null) for NaN and missing."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None
