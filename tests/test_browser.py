"""Tests for saev_core.browser: the data it embeds, and the page itself in headless Chromium.

The Chromium tests drive Debian's `chromium` through Playwright (the `chromium_tab` fixture of
tests/headless.py): they load the file from disk, type into the search box, click a feature,
click a neighbour, and read the console. They skip when no Chromium is installed (`make test`
installs it). The screenshot is kept as a test artifact: in
`$SAEV_TEST_ARTIFACTS` when set, else next to the test's temporary files.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from saev_core.browser import BrowserConfig, browser_data, build_browser, exemplar_grid
from saev_core.stats import StatsConfig, compute_stats, exemplar_heatmaps
from saev_core.stats.tables import write_stats

torch.set_num_threads(1)
N_IMG, GRID, D = 12, 2, 4  # images of CLS + 2 x 2 patches; 4 features


class LinearReluSAE(torch.nn.Module):
    """A real linear + ReLU encoder with hand-set weights."""

    def __init__(self, W_enc: torch.Tensor) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc)
        self.W_dec = torch.nn.Parameter(W_enc.T.clone())
        self.cfg = SimpleNamespace(d_sae=W_enc.shape[1])

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_bd @ self.W_enc)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A project with 12 PNG images, their shards' images.parquet, and one stats run."""
    root = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(0)
    n_tok = 1 + GRID * GRID
    image_id = np.repeat(np.arange(N_IMG), n_tok)
    token = np.tile(np.arange(n_tok), N_IMG)
    acts = rng.normal(0, 0.3, (len(token), 3)).astype(np.float32)
    rows, image_rows = [], []
    (root / "images").mkdir()
    for i in range(N_IMG):
        colour = "red" if i % 2 == 0 else "blue"
        patch = 1 + i % 4  # the object's patch
        acts[i * n_tok + patch, 0 if colour == "red" else 1] += 2.0 + i / 10
        rows.append((i, patch, colour))
        img = np.full((16, 16, 3), 128, np.uint8)
        r, c = divmod(patch - 1, GRID)
        img[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] = (
            (220, 30, 30) if colour == "red" else (30, 30, 220)
        )
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        image_rows.append((i, "val", f"images/{i}.png", [colour]))
    labels = pd.DataFrame(rows, columns=["image_id", "token", "label"])
    act_dir = root / "acts"
    act_dir.mkdir()
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array([r[0] for r in image_rows], pa.int64()),
                "split": [r[1] for r in image_rows],
                "path": [r[2] for r in image_rows],
                "labels": pa.array([r[3] for r in image_rows], pa.list_(pa.string())),
            }
        ),
        act_dir / "images.parquet",
    )
    W = torch.tensor([[1.0, 0, 0, 0.7], [0, 1.0, 0, 0.7], [0, 0, 1.0, 0]])
    sae = LinearReluSAE(W)
    batches = [(image_id, token, acts)]
    st = compute_stats(sae, batches, labels, None, 1, StatsConfig(n_top=4), "toy", False)
    exemplar_heatmaps(sae, batches, st, 4, progress=False)
    info = {"run": "toy", "shard_dir": "acts", "backbone": "tiny", "layer": 1, "d_sae": D}
    out = root / "stats" / "toy"
    write_stats(st, out, info)
    return SimpleNamespace(root=root, stats_dir=out, stats=st)


def test_browser_data_embeds_features_exemplars_and_heat_maps(run_dir):
    data = browser_data(run_dir.stats_dir, run_dir.root, BrowserConfig(n_exemplars=3))
    st = run_dir.stats
    assert data["run"] == "toy" and data["grid"] == [GRID, GRID] and len(data["features"]) == D
    red = next(f for f in data["features"] if f["id"] == 0)
    assert red["best"] == "red" and red["auroc"] == 1.0 and red["breadth"] == 1
    assert [e["image"] for e in red["ex"]] == st.top_image[0, :3].tolist()
    assert [n for n, _ in red["neighbors"]][:1] == [3]  # feature 3 reads red and blue
    for e in red["ex"]:
        heat = np.frombuffer(base64.b64decode(e["heat"]), np.uint8)
        # the patch where it peaks is the brightest, and the exemplar's value is the max there
        assert heat.argmax() == e["patch"] and heat.max() == round(255 * e["value"] / st.max_act[0])
        assert data["images"][str(e["image"])].startswith("data:image/jpeg;base64,")
    assert len(red["hist"]) == StatsConfig().n_bins + 1
    small = browser_data(run_dir.stats_dir, run_dir.root, BrowserConfig(max_features=2))
    assert len(small["features"]) == 2
    with pytest.raises(FileNotFoundError, match="not a stats directory"):
        browser_data(run_dir.root, run_dir.root)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A stats run over a class-folder source: image labels, no masks (so no patch labels).

    Feature 0 reads "ant" images (strongly), feature 1 "bee" (through noise), feature 2 is noise
    that no label explains, feature 3 reads both ant and bee."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(1)
    n_img, n_tok = 60, 1 + GRID * GRID
    classes = np.array(["ant", "bee", "cow"])[np.arange(n_img) % 3]
    image_id = np.repeat(np.arange(n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img)
    acts = rng.normal(0, 0.3, (len(token), 3)).astype(np.float32)
    for i, c in enumerate(classes):
        where = i * n_tok + 1 + rng.integers(GRID * GRID)  # some patch of the image
        if c == "ant":
            acts[where, 0] += 2.0
        if c == "bee":
            acts[where, 1] += rng.uniform(0, 1.0)
    act_dir = root / "acts"
    act_dir.mkdir()
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array(np.arange(n_img), pa.int64()),
                "split": ["val"] * n_img,
                "path": [f"images/{c}/{i}.png" for i, c in enumerate(classes)],
                "labels": pa.array([[c] for c in classes], pa.list_(pa.string())),
            }
        ),
        act_dir / "images.parquet",
    )
    W = torch.tensor([[1.0, 0, 0, 0.7], [0, 1.0, 0, 0.7], [0, 0, 1.0, 0]])
    sae = LinearReluSAE(W)
    image_labels = pd.DataFrame({"image_id": np.arange(n_img), "label": classes})
    st = compute_stats(
        sae, [(image_id, token, acts)], None, None, 1, StatsConfig(n_top=4), "cls", False,
        image_labels=image_labels,
    )  # fmt: skip
    info = {"run": "cls", "shard_dir": "acts", "backbone": "tiny", "layer": 1, "d_sae": D}
    out = root / "stats" / "cls"
    write_stats(st, out, info)
    # each image's score for a feature: its highest patch code (CLS excluded), as in the paper
    codes = torch.relu(torch.from_numpy(acts) @ W).numpy().reshape(n_img, n_tok, D)[:, 1:]
    return SimpleNamespace(root=root, stats_dir=out, classes=classes, image_max=codes.max(1))


def test_class_folder_runs_show_image_level_labels(class_run):
    from sklearn.metrics import roc_auc_score

    data = browser_data(class_run.stats_dir, class_run.root)
    assert data["label_level"] == "image" and data["min_auroc"] == 0.7
    table = pd.read_parquet(class_run.stats_dir / "feature_labels.parquet")
    assert table["auroc"].isna().all()  # no patch labels: patch AUROC cannot name anything
    shown = {}
    for f in data["features"]:
        exact = {
            c: roc_auc_score(class_run.classes == c, class_run.image_max[:, f["id"]])
            for c in ("ant", "bee", "cow")
        }
        best = max(exact, key=exact.get)
        assert f["level"] == "image" and f["labels"][0][0] == best
        assert f["auroc"] == pytest.approx(exact[best], abs=0.02)
        assert f["best"] == (best if exact[best] >= 0.7 else None)
        assert [lab[8] for lab in f["labels"]] == ["image"] * 3
        shown[f["id"]] = f["best"]
    assert shown[0] == "ant" and shown[1] == "bee"
    assert shown[2] is None  # noise: its best label is below the floor and shows as no label
    lenient = browser_data(class_run.stats_dir, class_run.root, BrowserConfig(min_auroc=0.5))
    assert next(f for f in lenient["features"] if f["id"] == 2)["best"] is not None
    with pytest.raises(ValueError, match="min_auroc"):
        BrowserConfig(min_auroc=1.5)


def test_floor_applies_to_patch_labels_too(run_dir):
    data = browser_data(run_dir.stats_dir, run_dir.root, BrowserConfig(min_auroc=0.99))
    assert data["label_level"] == "patch"
    for f in data["features"]:
        assert f["best"] == (f["labels"][0][0] if f["auroc"] >= 0.99 else None), f["id"]
    assert [f["best"] for f in data["features"]][:2] == ["red", "blue"]


def test_exemplar_grid_png(run_dir, tmp_path):
    path = exemplar_grid(run_dir.stats_dir, [0, 1], tmp_path / "grid.png", run_dir.root, 3, 32)
    im = Image.open(path)
    assert im.size == (150 + 3 * 36, 2 * 36)
    # the heat map tints the peak patch of feature 0's first exemplar red
    px = np.asarray(im.convert("RGB")).astype(int)
    tile = px[0:32, 150 : 150 + 32]
    assert (tile[..., 0] - tile[..., 2]).max() > 100


def test_html_is_self_contained(run_dir, tmp_path):
    path = build_browser(run_dir.stats_dir, tmp_path / "b.html", run_dir.root)
    html = path.read_text()
    assert "__DATA__" not in html and "toy" in html
    for remote in ("http://", "https://", 'src="//'):
        assert remote not in html, remote  # nothing to fetch: the file works offline


def test_browser_in_headless_chromium(run_dir, tmp_path, chromium_tab):
    html = build_browser(run_dir.stats_dir, tmp_path / "toy.html", run_dir.root)
    data = browser_data(run_dir.stats_dir, run_dir.root)
    want_red = sorted(
        f["id"] for f in data["features"]
        if "red" in (f["best"] or "") or "red" in (f["ex_label"] or "")
        or any("red" in lab and auc is not None and auc >= 0.7 for lab, auc, *_ in f["labels"])
    )  # fmt: skip
    assert 0 < len(want_red) < D
    page = chromium_tab.page
    page.goto(html.resolve().as_uri())
    ids = "[...document.querySelectorAll('#rows tr')].map((r) => Number(r.dataset.id))"
    assert sorted(page.evaluate(ids)) == list(range(D))
    # type into the search box: the list narrows to the features about red
    page.locator("#q").focus()
    page.keyboard.insert_text("red")
    assert sorted(page.evaluate(ids)) == want_red
    assert page.locator("#count").text_content().startswith(f"{len(want_red)} of {D}")
    # sort by AUROC, then click the first row: the feature opens with its exemplars
    page.locator("#sort").select_option("auroc")
    first = page.evaluate(ids)[0]
    assert first == 0  # feature 0 reads the red dimension: AUROC 1
    page.locator("#rows tr[data-id]").first.click()
    assert page.locator("#title").text_content() == "Feature 0"
    n_ex = len(next(f for f in data["features"] if f["id"] == 0)["ex"])
    assert page.locator("#exemplars .tile canvas").count() == n_ex
    assert page.locator("#exemplars .tile img").count() == n_ex
    assert page.locator("#hist rect").count() == 60
    assert "red" in page.locator("#assoc").text_content()
    assert page.evaluate("location.hash") == "#feature=0"
    # a neighbour link opens that feature
    page.locator("#neighbors a[data-nb]").first.click()
    nb = next(f for f in data["features"] if f["id"] == 0)["neighbors"][0][0]
    assert page.locator("#title").text_content() == f"Feature {nb}"
    out_dir = Path(os.environ.get("SAEV_TEST_ARTIFACTS", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "browser.png"
    page.screenshot(path=png)
    assert page.evaluate("window.saevErrors") == []
    assert chromium_tab.errors == []
    assert Image.open(png).size == (1280, 900)


def test_class_folder_browser_in_headless_chromium(class_run, tmp_path, chromium_tab):
    html = build_browser(class_run.stats_dir, tmp_path / "cls.html", class_run.root)
    page = chromium_tab.page
    page.goto(html.resolve().as_uri() + "#feature=2")
    best = (
        "Object.fromEntries([...document.querySelectorAll('#rows tr')]"
        ".map((r) => [r.dataset.id, r.children[1].textContent]))"
    )
    # image-level associations name the features; the noise feature shows no label
    assert page.evaluate(best) == {"0": "ant", "1": "bee", "2": "", "3": "ant"}
    assert page.locator("#best").text_content() == "no label"
    assert "image level" in page.locator("#legend").text_content()
    page.locator("#q").focus()
    # every feature lists "cow", none at or above the floor: the search finds none
    page.keyboard.insert_text("cow")
    assert page.locator("#rows tr").count() == 0
    assert page.locator("#count").text_content().startswith("0 of 4")
    assert page.evaluate("window.saevErrors") == []
    assert chromium_tab.errors == []


def test_best_label_is_chosen_on_the_select_split_and_shown_on_the_report_split(run_dir, tmp_path):
    """Feature 3 reads red and blue alike; make blue win on val (select) and red on test
    (report): the page must name blue (chosen on val) and show blue's test AUROC."""
    stats = tmp_path / "stats" / "toy"
    shutil.copytree(run_dir.stats_dir, stats)
    shutil.copytree(run_dir.root / "acts", tmp_path / "acts")
    shutil.copytree(run_dir.root / "images", tmp_path / "images")
    labels = pd.read_parquet(stats / "feature_labels.parquet")
    val, test = labels.assign(split="val"), labels.assign(split="test")
    f3 = (val.feature == 3) & (val.label == "blue")
    val.loc[f3, "auroc"] = 0.95
    val.loc[(val.feature == 3) & (val.label == "red"), "auroc"] = 0.90
    test.loc[(test.feature == 3) & (test.label == "blue"), "auroc"] = 0.80
    test.loc[(test.feature == 3) & (test.label == "red"), "auroc"] = 0.97
    pd.concat([val, test]).to_parquet(stats / "feature_labels.parquet")
    run = pd.read_parquet(stats / "run.parquet").assign(select_split="val", report_split="test")
    run.to_parquet(stats / "run.parquet")
    f = next(f for f in browser_data(stats, tmp_path)["features"] if f["id"] == 3)
    assert f["best"] == "blue" and f["auroc"] == 0.80
    assert [lab[0] for lab in f["labels"]][:2] == ["blue", "red"]
    floor = BrowserConfig(
        min_auroc=0.96
    )  # blue's val AUROC is below it: no label, whatever test says
    assert (
        next(f for f in browser_data(stats, tmp_path, floor)["features"] if f["id"] == 3)["best"]
        is None
    )
