"""`saev explore`'s API over a tiny real run (tests/explore_fixtures.py), through FastAPI's
TestClient. Predictions are compared with the transformers model run directly on the
processor's pixels, features with the SAE's encode of the hidden states transformers itself
returns (and of the extracted shards), images with the files on disk."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from explore_fixtures import LAYER, explore_run  # noqa: F401  (the fixture)
from PIL import Image

from saev_core.data import load_records
from saev_core.sae import SAE


@pytest.fixture(scope="module")
def app(explore_run):  # noqa: F811
    from fastapi.testclient import TestClient

    from flows.explore import log_intervention
    from saev_core.explore import create_app, load, parse_args, resolve_config

    cfg = resolve_config(parse_args(["--params", str(explore_run["params"])]))
    ex = load(cfg)
    return TestClient(create_app(ex, log_intervention, hosts=("testserver",))), ex, explore_run


def hf_forward(run, image: Image.Image):
    """The classifier's sigmoid probabilities and block outputs, straight from transformers."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(run["model"]).eval()
    px = AutoImageProcessor.from_pretrained(run["model"])(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=px["pixel_values"], output_hidden_states=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return labels, torch.sigmoid(out.logits)[0].numpy(), out.hidden_states, model, px


def record(run, key):
    split, image_id = key.split(":")
    return next(r for r in load_records(run["data"]) if r.image_id == int(image_id))


def post(client, path, body, status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_info_names_the_run(app):
    client, _, run = app
    info = client.get("/api/info").json()
    cfg = json.loads((run["model"] / "config.json").read_text())
    assert info["classes"] == [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    probe = json.loads((run["probe_dir"] / "segmentation" / "probe.json").read_text())
    assert info["seg_classes"] == probe["classes"]
    assert info["tasks"] == ["classification", "segmentation"]
    assert (info["grid"], info["patch_size"], info["image_size"]) == ([4, 4], 8, [32, 32])
    assert info["n_images"] == {"train": 16, "val": 8, "test": 8}
    assert (info["d_sae"], info["layer"], info["run"]) == (64, LAYER, "tiny")
    assert info["browser_url"] == "/browser" and client.get("/browser").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<" in page.text


def test_images_by_label_random_and_png(app):
    client, _, run = app
    test = [r for r in load_records(run["data"], ["test"])]
    red = client.get("/api/images", params={"split": "test", "label": "red"}).json()
    assert [x["image_id"] for x in red] == [r.image_id for r in test if "red" in r.labels]
    assert red and all("red" in x["labels"] and x["key"] == f"test:{x['image_id']}" for x in red)
    pick = client.get("/api/images", params={"split": "all", "random": 1, "limit": 5}).json()
    assert len({x["key"] for x in pick}) == 5
    assert client.get("/api/images", params={"split": "nope"}).status_code == 400

    key = red[0]["key"]
    png = client.get(f"/api/image/{key}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(png.content)))
    # the world's images are 32 px, the processor's size: the model sees the file as it is
    want = np.asarray(Image.open(record(run, key).path).convert("RGB"))
    np.testing.assert_array_equal(got, want)
    assert client.get("/api/image/test:99999.png").status_code == 404


def test_class_examples(app):
    client, _, _ = app
    ex = client.get("/api/class/blue/examples", params={"limit": 3}).json()
    assert 0 < len(ex) <= 3
    for e in ex:
        img = client.get("/api/images", params={"split": e["key"].split(":")[0], "limit": 1000})
        labels = {x["key"]: x["labels"] for x in img.json()}
        assert "blue" in labels[e["key"]] and e["url"] == f"/api/image/{e['key']}.png"
    assert client.get("/api/class/unicorn/examples").status_code == 404


def test_features_are_the_sae_codes_of_the_selected_patches(app):
    client, _, run = app
    key = "test:24"
    patches = [0, 5, 6, 9]
    out = post(client, "/api/features", {"image": key, "patches": patches, "n": 5})["features"]
    assert 0 < len(out) <= 5
    # independent: transformers' own hidden state after the SAE's block, through the SAE
    _, _, hidden, _, _ = hf_forward(run, Image.open(record(run, key).path).convert("RGB"))
    sae = SAE.load(run["sae_dir"])
    with torch.no_grad():
        codes = sae.encode(hidden[LAYER + 1][0]).numpy()  # hidden_states[0] = embeddings
    summed = codes[1 + np.array(patches)].sum(0)
    want = [f for f in np.argsort(-summed, kind="stable") if summed[f] > 0][: len(out)]
    assert [f["feature"] for f in out] == [int(f) for f in want]
    np.testing.assert_allclose([f["value"] for f in out], summed[want], atol=1e-4)
    top = out[0]
    np.testing.assert_allclose(top["per_patch"], codes[1:, top["feature"]], atol=1e-4)
    # and the extracted shard rows of this image (float16) give the same sums, to fp16 error
    table = pq.read_table(run["shards"] / f"layer={LAYER}").to_pandas()
    rows = table[table.image_id == 24].sort_values("token")
    acts = np.stack([np.frombuffer(a, np.float16) for a in rows.act]).astype(np.float32)
    with torch.no_grad():
        shard_codes = sae.encode(torch.from_numpy(acts)).numpy()
    assert top["value"] == pytest.approx(
        shard_codes[1 + np.array(patches), top["feature"]].sum(), rel=0.05
    )

    feats = pd.read_parquet(run["stats_dir"] / "features.parquet").set_index("feature")
    assert top["max_act"] == pytest.approx(feats.loc[top["feature"], "max_act"])
    assert top["frequency"] == pytest.approx(feats.loc[top["feature"], "freq"])
    tops = pd.read_parquet(run["stats_dir"] / "top_examples.parquet")
    first = tops[tops.feature == top["feature"]].sort_values("rank").image_id.iloc[0]
    split = {r.image_id: r.split for r in load_records(run["data"])}[first]
    assert top["exemplars"][0]["key"] == f"{split}:{first}"
    assert top["browser_url"] == f"/browser#feature={top['feature']}"
    assert all(0.5 <= lab["auroc"] <= 1 or lab["auroc"] < 0.5 for lab in top["labels"])

    # the frequency filter drops every feature outside the range
    lo = top["frequency"] + 1e-9
    kept = post(client, "/api/features", {"image": key, "patches": patches, "min_freq": lo})
    assert all(f["frequency"] >= lo for f in kept["features"])
    assert top["feature"] not in [f["feature"] for f in kept["features"]]
    # no patches = every patch
    every = post(client, "/api/features", {"image": key, "n": 3})["features"]
    all_sum = codes[1:].sum(0)
    assert every[0]["value"] == pytest.approx(all_sum.max(), abs=1e-4)


def test_predict_without_edits_is_the_plain_forward(app):
    client, ex, run = app
    key = "test:25"
    image = Image.open(record(run, key).path).convert("RGB")
    labels, probs, _, _, px = hf_forward(run, image)
    out = post(client, "/api/predict", {"image": key, "edits": [], "seq": 7})
    assert out["seq"] == 7 and out["ms"] >= 0
    cls = out["classification"]
    np.testing.assert_allclose(cls["probs"]["before"], probs, atol=1e-5)
    np.testing.assert_allclose(cls["probs"]["after"], probs, atol=1e-5)
    order = np.argsort(-probs)[:5]
    assert [c["class"] for c in cls["before"]] == [labels[i] for i in order]
    assert [c["prob"] for c in cls["before"]] == pytest.approx(probs[order], abs=1e-5)

    from transformers import ViTModel

    from saev_core.probes import load_probe, patch_targets

    probe, meta = load_probe(run["probe_dir"] / "segmentation")
    base = ViTModel.from_pretrained(run["model"], add_pooling_layer=False).eval()
    with torch.no_grad():
        seg_p = probe.probs(base(pixel_values=px["pixel_values"]).last_hidden_state)[0].numpy()
    seg = out["segmentation"]
    assert seg["classes"] == meta["classes"]
    assert seg["before"] == seg["after"] == seg_p.argmax(-1).tolist()
    lay = ex.readers["segmentation"].layout
    want_truth = patch_targets(record(run, key), meta["classes"], lay.grid, lay.geometry)
    assert seg["truth"] == want_truth.tolist()


def test_an_edit_changes_the_prediction_as_a_full_spliced_forward_does(app):
    """The fast path (cached residual stream, later blocks only) gives what a whole forward
    of the transformers model with the SAE spliced in gives."""
    from saev_core.intervene import FeatureEdit, Splice, splice

    client, ex, run = app
    key = "test:26"
    top = post(client, "/api/features", {"image": key, "n": 1})["features"][0]
    f = top["feature"]
    out = post(client, "/api/predict", {"image": key, "edits": [{"feature": f, "scale": 4.0}],
                                        "where": "image"})  # fmt: skip
    before = np.array(out["classification"]["probs"]["before"])
    after = np.array(out["classification"]["probs"]["after"])
    assert np.abs(after - before).max() > 1e-3

    image = Image.open(record(run, key).path).convert("RGB")
    _, _, _, model, px = hf_forward(run, image)
    sae = SAE.load(run["sae_dir"])
    edit = FeatureEdit("clamp", (f,), 4.0, (top["max_act"],))
    with torch.no_grad(), splice(model.vit.layers, Splice(LAYER, sae, edit)):
        want = torch.sigmoid(model(pixel_values=px["pixel_values"]).logits)[0].numpy()
    np.testing.assert_allclose(after, want, atol=1e-5)


def test_one_forward_after_the_sae_serves_both_tasks(app):
    """The segmentation probe reads the classifier's own backbone (the same weights): an edit
    reruns the blocks after the SAE's once, not once per task, and its segmentation is still
    transformers' ViTModel + the probe with the SAE spliced in, run whole."""
    from transformers import ViTModel

    from saev_core.intervene import FeatureEdit, Splice, splice
    from saev_core.probes import load_probe

    client, ex, run = app
    key = "test:28"
    post(client, "/api/predict", {"image": key})  # the cache is filled
    f = post(client, "/api/features", {"image": key, "n": 1})["features"][0]
    runs = []
    handles = [
        block.register_forward_hook(lambda *a, i=i: runs.append(i))
        for reader in ex.readers.values()
        for i, block in enumerate(reader.blocks)
    ]
    try:
        out = post(client, "/api/predict", {"image": key, "where": "image",
                                            "edits": [{"feature": f["feature"], "scale": 6}]})  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    n_blocks = len(ex.readers["classification"].blocks)
    assert sorted(i for i in runs if i > LAYER) == list(range(LAYER + 1, n_blocks))

    probe, _ = load_probe(run["probe_dir"] / "segmentation")
    base = ViTModel.from_pretrained(run["model"], add_pooling_layer=False).eval()
    _, _, _, _, px = hf_forward(run, Image.open(record(run, key).path).convert("RGB"))
    edit = FeatureEdit("clamp", (f["feature"],), 6.0, (f["max_act"],))
    with torch.no_grad():
        plain = probe.probs(base(pixel_values=px["pixel_values"]).last_hidden_state)[0]
        with splice(base.layers, Splice(LAYER, SAE.load(run["sae_dir"]), edit)):
            edited = probe.probs(base(pixel_values=px["pixel_values"]).last_hidden_state)[0]
    seg = out["segmentation"]
    assert seg["before"] == plain.argmax(-1).tolist()
    assert seg["after"] == edited.argmax(-1).tolist()


def test_a_headless_backbone_with_both_probes_runs_one_forward(explore_run, tmp_path):  # noqa: F811
    """The same weights declared as a plain ViTModel (no head): both probes read it, from one
    forward, and give each probe on transformers' own last hidden state."""
    import shutil

    from fastapi.testclient import TestClient
    from transformers import ViTModel

    from saev_core.explore import create_app, load, parse_args, resolve_config
    from saev_core.probes import load_probe

    model = tmp_path / "headless"
    shutil.copytree(explore_run["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["ViTModel"]}))
    args = ["--params", str(explore_run["params"]), "--model", str(model)]
    ex = load(resolve_config(parse_args(args)))
    assert ex.readers["classification"].probe is not None and ex._shared is not None
    client = TestClient(create_app(ex, hosts=("testserver",)))
    key = "test:29"
    runs = []
    handles = [
        block.register_forward_hook(lambda *a, i=i: runs.append(i))
        for reader in ex.readers.values()
        for i, block in enumerate(reader.blocks)
    ]
    try:
        ex.state(key)  # the image's first, whole forward
    finally:
        for h in handles:
            h.remove()
    assert sorted(runs) == list(range(len(ex.readers["classification"].blocks)))
    out = post(client, "/api/predict", {"image": key})
    _, _, _, _, px = hf_forward(explore_run, Image.open(record(explore_run, key).path))
    base = ViTModel.from_pretrained(explore_run["model"], add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = base(pixel_values=px["pixel_values"]).last_hidden_state
        cls_probe, _ = load_probe(explore_run["probe_dir"] / "classification")
        seg_probe, _ = load_probe(explore_run["probe_dir"] / "segmentation")
        want_cls = cls_probe.probs(hidden)[0].numpy()
        want_seg = seg_probe.probs(hidden)[0].argmax(-1).tolist()
    np.testing.assert_allclose(out["classification"]["probs"]["before"], want_cls, atol=1e-5)
    assert out["segmentation"]["before"] == want_seg


def test_untouched_and_scale_zero_differ(app):
    client, _, _ = app
    key = "test:27"
    feats = post(client, "/api/features", {"image": key, "patches": [5], "n": 1})["features"]
    f, patch = feats[0]["feature"], [5]
    untouched = post(client, "/api/predict", {"image": key, "patches": patch})
    ablated = post(client, "/api/predict", {"image": key, "patches": patch,
                                            "edits": [{"feature": f, "scale": 0.0}]})  # fmt: skip
    a = np.array(untouched["classification"]["probs"]["after"])
    b = np.array(ablated["classification"]["probs"]["after"])
    assert np.abs(a - b).max() > 1e-6
    # an edit on other patches than where the feature fires is an edit of nothing there
    codes = np.array(feats[0]["per_patch"])
    silent = [int(p) for p in np.flatnonzero(codes == 0)[:1]]
    if silent:
        elsewhere = post(client, "/api/predict", {"image": key, "patches": silent,
                                                  "edits": [{"feature": f, "scale": 0.0}]})  # fmt: skip
        np.testing.assert_allclose(elsewhere["classification"]["probs"]["after"], a, atol=1e-6)


def test_bad_requests_get_4xx_with_a_reason(app):
    client, ex, _ = app
    r = client.post("/api/predict", json={"image": "test:24", "edits": [{"feature": 64,
                                                                        "scale": 1}]})  # fmt: skip
    assert r.status_code == 400 and "unknown feature 64" in r.json()["detail"]
    r = client.post("/api/predict", json={"image": "test:24", "patches": [16]})
    assert r.status_code == 400 and "outside the grid" in r.json()["detail"]
    assert client.post("/api/predict", json={"image": "nope:1"}).status_code == 404
    assert client.post("/api/predict", json={"image": "test:24", "where": "x"}).status_code == 422
    assert client.post("/api/features", json={"patches": []}).status_code == 422


def test_uploads_are_checked_and_served(app):
    client, _, _ = app
    r = client.post("/api/upload", files={"file": ("x.png", b"hello, not an image", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    good = buf.getvalue()
    r = client.post("/api/upload", files={"file": ("x.png", good[: len(good) // 2], "image/png")})
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    big = b"\x89PNG" + bytes(4 * 2**20 + 10)
    r = client.post("/api/upload", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "4 MiB" in r.json()["detail"]
    r = client.post("/api/upload", files={"other": ("x.png", good, "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]

    import hashlib

    key = client.post("/api/upload", files={"file": ("x.png", good, "image/png")}).json()["key"]
    assert key == "upload:" + hashlib.sha256(good).hexdigest()[:16]
    png = Image.open(io.BytesIO(client.get(f"/api/image/{key}.png").content))
    assert png.size == (32, 32)  # resized by the processor's geometry
    out = post(client, "/api/predict", {"image": key})
    assert out["segmentation"]["truth"] is None and out["classification"]["before"]


def test_thumbnails_need_no_forward_and_uploads_keep_no_decoded_picture(app):
    """The page shows each feature's exemplars (up to 12 x 6 images): serving one costs no
    forward (nor a place in the state cache), and an upload of a large picture keeps its
    bytes, not 27 MB of decoded pixels."""
    import gc

    client, ex, run = app
    runs = []
    block = ex.readers["classification"].blocks[0]
    handle = block.register_forward_hook(lambda *a: runs.append(1))
    try:
        for r in load_records(run["data"], ["train"]):
            png = client.get(f"/api/image/train:{r.image_id}.png")
            assert png.status_code == 200
            got = np.asarray(Image.open(io.BytesIO(png.content)))
            np.testing.assert_array_equal(got, np.asarray(Image.open(r.path).convert("RGB")))
    finally:
        handle.remove()
    assert runs == []
    assert not any(k.startswith("train:") for k in ex._states)

    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000), (20, 200, 60)).save(buf, format="PNG")
    key = client.post("/api/upload", files={"file": ("big.png", buf.getvalue())}).json()["key"]
    assert post(client, "/api/predict", {"image": key})["classification"]["before"]
    gc.collect()
    pil = [o for o in gc.get_objects() if str(type(o).__module__).startswith("PIL.")]
    assert [o for o in pil if isinstance(o, Image.Image) and o.size == (3000, 3000)] == []


def test_log_records_an_mlflow_run(app, tmp_path, monkeypatch):
    import mlflow

    client, _, _ = app
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    body = {"image": "test:24", "edits": [{"feature": 3, "scale": -2.0}], "where": "image"}
    out = post(client, "/api/log", body)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(out["run_id"])
    assert run.info.experiment_id == out["experiment_id"]
    assert run.data.params["image"] == "test:24" and run.data.params["edits"] == "3:-2"
    assert run.data.params["where"] == "image" and run.data.tags["stage"] == "explore"
    assert "p_before.red" in run.data.metrics and "max_abs_dp" in run.data.metrics
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])]
    assert "intervention.json" in arts


def test_a_missing_run_or_probe_stops_at_start_up(explore_run, tmp_path, capsys):  # noqa: F811
    from saev_core.cli import main

    params = str(explore_run["params"])
    assert main(["explore", "--params", params, "--sae-dir", str(tmp_path / "nope"),
                 "--check"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "missing" in err and "nope/cfg.json" in err and "Traceback" not in err
    assert main(["explore", "--params", params, "--probe-dir", str(tmp_path), "--check"]) == 1
    assert "no probe in" in capsys.readouterr().err
    assert main(["explore", "--params", params, "--check", "--host", "0.0.0.0"]) == 0
    captured = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in captured.err and "run tiny" in captured.out
    # a probe of other weights: refused when named, skipped (with a message) by default
    import shutil

    other = tmp_path / "other"
    shutil.copytree(explore_run["probe_dir"] / "segmentation", other)
    meta = json.loads((other / "probe.json").read_text())
    (other / "probe.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    assert main(["explore", "--params", params, "--probe-dir", str(other), "--check"]) == 1
    assert "other weights" in capsys.readouterr().err
    from saev_core.explore import load, parse_args, resolve_config

    cfg = resolve_config(parse_args(["--params", params]))
    ex = load(type(cfg)(**{**cfg.__dict__, "probe_dir": str(other)}))
    assert list(ex.readers) == ["classification"]
    assert "segmentation probe skipped" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip_vision", "dinov2_registers",
                                    "beit"])  # fmt: skip
def test_the_fast_path_is_a_whole_forward_in_every_family(family, tmp_path):
    """Rerunning only the blocks after the SAE's from its cached output, with and without an
    edit, gives the whole spliced forward's last hidden state in each backbone family."""
    from test_families import FAMILIES

    from saev_core.backbone import load_backbone, preprocess, record_blocks
    from saev_core.explore import resume_after, returns_tuple
    from saev_core.intervene import FeatureEdit, Splice, splice
    from saev_core.sae import SAEConfig

    fam = FAMILIES[family]
    torch.manual_seed(0)
    fam.build().save_pretrained(tmp_path / family)
    fam.processor().save_pretrained(tmp_path / family)
    bb = load_backbone(str(tmp_path / family), device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    px = preprocess(bb, [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))])
    sae = SAE(SAEConfig(arch="topk", d_model=32, d_sae=16, k=4))
    edit = FeatureEdit("clamp", (1, 5), 1.0, (3.0, -2.0))

    def run(**kw):
        return bb.model(pixel_values=px, **kw).last_hidden_state

    layer = 0
    with torch.no_grad():
        with record_blocks(bb.blocks, [layer]) as acts:
            plain = run()
        with splice(bb.blocks, Splice(layer, sae, edit)):
            edited = run()
        as_tuple = returns_tuple(bb.blocks, layer, lambda x: run(), bb.image_size, "cpu")
        with resume_after(bb.blocks, layer, acts[layer], as_tuple):
            fast_plain = run()
            with splice(bb.blocks, Splice(layer, sae, edit)):
                fast_edited = run()
        again = run()  # the blocks are themselves again afterwards
    assert (edited - plain).abs().max() > 1e-3
    torch.testing.assert_close(fast_plain, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_edited, edited, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain)


def test_a_folder_run_with_a_headless_hub_backbone(tmp_path):
    """Class folders, a CLIP tower without head (its classification probe reads it), no masks,
    no test split: the app serves it, the unedited prediction is CLIP + probe run directly, the
    image is what CLIP's processor (short-side resize, centre crop) makes of the photo."""
    from explore_fixtures import build_folder_run
    from fastapi.testclient import TestClient
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from saev_core.explore import create_app, load, parse_args, resolve_config
    from saev_core.probes import load_probe

    run = build_folder_run(tmp_path / "run")
    ex = load(resolve_config(parse_args(["--params", str(run["params"])])))
    client = TestClient(create_app(ex, hosts=("testserver",)))
    info = client.get("/api/info").json()
    probe, meta = load_probe(run["probe_dir"] / "classification")
    assert info["tasks"] == ["classification"] and info["classes"] == meta["classes"]
    assert info["seg_classes"] == [] and info["splits"] == ["train", "val"]
    assert info["default_split"] == "val" and info["browser_url"] is None
    key = client.get("/api/images").json()[0]["key"]
    photo = Image.open(record(run, key).path).convert("RGB")
    assert photo.size == (48, 36)

    processor = CLIPImageProcessor.from_pretrained(run["model"])
    px = processor(images=[photo], return_tensors="pt")["pixel_values"]
    model = CLIPVisionModel.from_pretrained(run["model"]).eval()
    with torch.no_grad():
        want = probe.probs(model(pixel_values=px).last_hidden_state)[0].numpy()
    out = post(client, "/api/predict", {"image": key})["classification"]
    np.testing.assert_allclose(out["probs"]["before"], want, atol=1e-5)
    np.testing.assert_allclose(out["probs"]["after"], want, atol=1e-5)

    png = np.asarray(Image.open(io.BytesIO(client.get(f"/api/image/{key}.png").content)))
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    seen = (px[0].numpy().transpose(1, 2, 0) * std + mean) * 255  # the processor's own crop
    assert png.shape == (32, 32, 3) and np.abs(png - seen).max() <= 3

    f = post(client, "/api/features", {"image": key, "n": 1})["features"][0]["feature"]
    edited = post(client, "/api/predict", {"image": key, "where": "image",
                                           "edits": [{"feature": f, "scale": -5}]})  # fmt: skip
    assert np.abs(np.array(edited["classification"]["probs"]["after"]) - want).max() > 1e-4
    assert edited["segmentation"] is None


def test_foreign_hosts_cross_site_posts_and_form_uploads_are_refused(app, monkeypatch):
    """DNS rebinding (a foreign Host), a POST from another site (Origin / Sec-Fetch-Site) and
    an upload a cross-site HTML form could send (text/plain, urlencoded) are refused; the
    upload's decoding runs off the event loop (no running loop in its thread)."""
    import asyncio

    from fastapi.testclient import TestClient

    from saev_core.explore import create_app

    client, ex, _ = app
    prod = TestClient(create_app(ex))  # no extra hosts: what `saev explore` serves by default
    assert prod.get("/api/info").status_code == 400  # Host "testserver" is not loopback
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert prod.get("/api/info", headers={"Host": host}).status_code == 200, host
    assert prod.get("/api/info", headers={"Host": "rebind.attacker.example"}).status_code == 400
    lan = TestClient(create_app(ex, hosts=("10.1.2.3",)))
    assert lan.get("/api/info", headers={"Host": "10.1.2.3:8000"}).status_code == 200

    body = {"image": "test:24"}
    evil = client.post("/api/predict", json=body, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "evil.example" in evil.json()["detail"]
    assert client.post("/api/predict", json=body,
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403  # fmt: skip
    ok = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/predict", json=body, headers=ok).status_code == 200
    assert client.get("/api/info", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 200, 30)).save(buf, format="PNG")
    good = buf.getvalue()
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/api/upload", content=good, headers={"Content-Type": ctype})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], ctype
    where = []
    real = ex.upload

    def upload(data):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return real(data)

    monkeypatch.setattr(ex, "upload", upload)
    r = client.post("/api/upload", content=good, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["key"].startswith("upload:")
    assert where == ["worker thread"]


def test_exemplar_keys_resolve_a_relative_shard_dir_or_show_none(tmp_path, monkeypatch):
    """run.parquet's shard_dir relative to the repository, served from another directory: it is
    found beside the stats (shard image 100 is record train:7, not record 100); where it is
    nowhere, a warning and no exemplars instead of taking shard ids for record ids."""
    from types import SimpleNamespace

    from saev_core.explore import Explorer

    (tmp_path / "artifacts" / "shards").mkdir(parents=True)
    stats = tmp_path / "artifacts" / "stats" / "run"
    stats.mkdir(parents=True)
    pd.DataFrame({"image_id": [100, 101], "key": ["a.png", "b.png"]}).to_parquet(
        tmp_path / "artifacts" / "shards" / "images.parquet"
    )
    pd.DataFrame({"shard_dir": ["artifacts/shards"]}).to_parquet(stats / "run.parquet")
    recs = [SimpleNamespace(key="b.png", split="train", image_id=7),
            SimpleNamespace(key="a.png", split="val", image_id=100)]  # fmt: skip
    fake = SimpleNamespace(records=recs)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert Explorer._exemplar_keys(fake, stats) == {100: "val:100", 101: "train:7"}
    pd.DataFrame({"shard_dir": ["gone/shards"]}).to_parquet(stats / "run.parquet")
    with pytest.warns(UserWarning, match="shard_dir 'gone/shards'.*no exemplars"):
        assert Explorer._exemplar_keys(fake, stats) == {}


def test_heat_maps_are_one_float32_array_converted_row_by_row(tmp_path, app):
    import pyarrow as pa

    from saev_core.explore import HeatMaps

    rng = np.random.default_rng(0)
    vals = rng.random((5, 9)).astype(np.float32)
    flat = pa.array(vals.reshape(-1), pa.float32(), mask=np.eye(5, 9, dtype=bool).reshape(-1))
    table = pa.table({"feature": pa.array([3, 3, 8, 9, 9], pa.int32()),
                      "image_id": pa.array([10, 11, 10, 12, 13], pa.int64()),
                      "values": pa.ListArray.from_arrays(pa.array(np.arange(0, 46, 9, dtype=np.int32)), flat)})  # fmt: skip
    pq.write_table(table, tmp_path / "heatmaps.parquet")
    hm = HeatMaps.read(tmp_path / "heatmaps.parquet")
    assert hm.values_rp.dtype == np.float32 and hm.values_rp.shape == (5, 9) and len(hm) == 5
    back = pd.read_parquet(tmp_path / "heatmaps.parquet")  # pandas' own reading
    for f, i, v in zip(back.feature, back.image_id, back["values"], strict=True):
        got = hm.get((f, i))
        want = [None if np.isnan(a) else round(float(a), 4) for a in v]
        assert got == [pytest.approx(w, abs=1e-6) if w is not None else None for w in want]
    assert hm.get((3, 10))[0] is None and hm.get((3, 12)) is None
    _, ex, _ = app
    assert isinstance(ex._heat, HeatMaps)
