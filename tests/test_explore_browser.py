"""`saev explore` in a real browser: the page (saev_core/explore/explore.html) over the real app.

The app (saev_core.explore.create_app over `explore_fixtures.build_explore_run`: a tiny demo ViT,
its SAE, stats and probes) is served by uvicorn on a free loopback port in a thread, and
Playwright drives Debian's Chromium (tests/headless.py) like a person: click a patch, move a
slider, read the prediction, reopen the link. The numbers the page shows are checked against
the classifier run directly through transformers, and against the API answering the request
the link describes.

The screenshot goes to tmp_path; `make screenshot` sets SAEV_EXPLORE_SCREENSHOT to write it to
docs/explore.png for the README (a plain `make test` writes nothing into the repository).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

PREDICTION = "[data-testid=prediction]"
MAX_FREQ = 0.25  # the page's default frequency filter (explore.html's #max-freq)
REPO = Path(__file__).resolve().parents[1]


def test_page_is_one_self_contained_file():
    """Nothing fetched from outside (no CDN, no remote font) and every part a test names."""
    from saev_core.explore import PAGE

    html = PAGE.read_text()
    for remote in ("http://", "https://", 'src="//', 'href="//', "@import"):
        assert remote not in html, remote
    for testid in ("image-picker", "patch", "feature", "slider", "prediction"):
        assert f'data-testid="{testid}"' in html or f'testid = "{testid}"' in html, testid


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def explore(tmp_path_factory):
    """The app over the tiny run, on 127.0.0.1:<free port>; stopped when the module ends."""
    from explore_fixtures import build_explore_run

    from flows.explore import log_intervention
    from saev_core.explore import create_app, load, parse_args, resolve_config

    paths = build_explore_run(tmp_path_factory.mktemp("explore"))
    logged: list[dict] = []
    # the app's own MLflow callback, into a sqlite store of this test's
    store = f"sqlite:///{paths['mlruns'] / 'mlflow.db'}"
    paths["mlruns"].mkdir()
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = store

    def log_run(record: dict) -> dict:
        logged.append(record)
        return log_intervention(record)

    ex = load(resolve_config(parse_args(["--params", str(paths["params"])])))
    try:
        with _serve(create_app(ex, log_run)) as url:
            yield {"url": url, "paths": paths, "logged": logged, "store": store}
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


@contextlib.contextmanager
def _serve(app):
    """`app` under uvicorn on 127.0.0.1:<free port> in a thread; yields its address."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _test_keys(base: str) -> list[str]:
    """The keys of the test split's images (ids are global: test's do not start at 0)."""
    return [r["key"] for r in json.loads(_get(f"{base}/api/images?split=test"))]


def _shown(page, side: str) -> dict[str, float]:
    """The probabilities the prediction panel shows on one side ("before" or "after")."""
    rows = page.locator(f"{PREDICTION} .bar-row[data-side={side}]")
    return {r.get_attribute("data-class"): float(r.get_attribute("data-prob")) for r in rows.all()}


def _wait_prediction(page, after_seq: int) -> int:
    """Wait until the panel shows an answer newer than `after_seq`; its seq."""
    page.wait_for_function(
        f"Number(document.querySelector('{PREDICTION}').dataset.seq) > {after_seq}"
    )
    return int(page.locator(PREDICTION).get_attribute("data-seq"))


def _settled(page) -> None:
    """No request of the page in flight or scheduled (the page counts them in saevBusy)."""
    page.wait_for_function("window.saevBusy === 0")


def _query(page) -> dict[str, str]:
    """The view's URL query. Read in the page: Playwright's page.url follows history.replaceState
    a moment later."""
    return {k: v[0] for k, v in parse_qs(urlparse(page.evaluate("location.href")).query).items()}


def _hf_top5(model_dir: Path, png: bytes) -> dict[str, float]:
    """The classifier's top 5 on the served image, straight through transformers."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    pixels = proc(images=Image.open(io.BytesIO(png)).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        logits = model(**pixels).logits[0]
    # the demo classifier is multi-label (an image holds several shapes and colours): sigmoids
    multi = model.config.problem_type == "multi_label_classification"
    p = (logits.sigmoid() if multi else logits.softmax(-1)).numpy()
    order = np.argsort(-p)[:5]
    return {model.config.id2label[int(i)]: float(p[i]) for i in order}


def _slider_to(page, card, fraction: float) -> None:
    """A real mouse click on the card's slider at `fraction` of its width (0, 1: its ends)."""
    box = card.get_by_test_id("slider").bounding_box()
    x = box["x"] + 2 + fraction * (box["width"] - 4)  # 2 px inside: still on the element
    page.mouse.click(x, box["y"] + box["height"] / 2)


def test_click_a_patch_move_a_slider_and_the_prediction_changes(chromium_tab, explore, tmp_path):
    page, base = chromium_tab.page, explore["url"]
    key = _test_keys(base)[1]
    page.goto(f"{base}/?image={key}")
    page.get_by_test_id("feature").first.wait_for()
    seq = _wait_prediction(page, 0)
    before = _shown(page, "before")
    # unedited: after is before, and both are the classifier's own answer on this image
    assert _shown(page, "after") == pytest.approx(before, abs=1e-6)
    direct = _hf_top5(explore["paths"]["model"], _get(f"{base}/api/image/{key}.png"))
    assert list(before) == list(direct)
    np.testing.assert_allclose(list(before.values()), list(direct.values()), atol=1e-5)

    # click one patch: it is selected, the link says so, the features are those of that patch
    patches = page.get_by_test_id("patch")
    gh, gw = json.loads(_get(f"{base}/api/info"))["grid"]
    assert patches.count() == gh * gw
    patches.nth(5).click()
    assert "sel" in patches.nth(5).get_attribute("class")
    assert _query(page)["patches"] == "5"
    _settled(page)
    want = _post(f"{base}/api/features",
                 {"image": key, "patches": [5], "n": 12, "max_freq": MAX_FREQ})  # fmt: skip
    cards = page.get_by_test_id("feature")
    shown = [int(c.get_attribute("data-feature")) for c in cards.all()]
    assert shown == [f["feature"] for f in want["features"]] and shown

    # the top feature's slider to its left end (-5 x max), on the selected patch
    card = cards.first
    assert card.locator(".scale").text_content() == "untouched"
    _slider_to(page, card, 0.0)
    seq = _wait_prediction(page, seq)
    feature = shown[0]
    q = _query(page)
    assert q["edits"] == f"{feature}:-5" and q["where"] == "selected" and q["image"] == key
    assert "-5.00" in card.locator(".scale").text_content()
    after = _shown(page, "after")
    assert _shown(page, "before") == before
    assert max(abs(after.get(c, 0) - p) for c, p in before.items()) > 1e-4  # it moved
    # what the page shows is what the API answers for the request the link describes
    api = _post(
        f"{base}/api/predict",
        {"image": key, "edits": [{"feature": feature, "scale": -5}], "where": "selected",
         "patches": [5]},
    )  # fmt: skip
    assert after == {r["class"]: r["prob"] for r in api["classification"]["after"]}

    # 0 is an edit (ablation), untouched is none: back to exactly the unedited answer
    card.locator("button.ablate").click()
    seq = _wait_prediction(page, seq)
    assert _query(page)["edits"] == f"{feature}:0"
    ablated = _shown(page, "after")
    assert max(abs(ablated.get(c, 0) - p) for c, p in before.items()) > 1e-6  # it fired there
    card.locator("button.untouch").click()
    seq = _wait_prediction(page, seq)
    assert "edits" not in _query(page) and card.locator(".scale").text_content() == "untouched"
    assert _shown(page, "after") == pytest.approx(before, abs=1e-6)

    # a link reproduces the view: same patches, slider, prediction
    _slider_to(page, card, 0.0)
    seq = _wait_prediction(page, seq)
    _settled(page)
    link = page.evaluate("location.href")
    other = page.context.new_page()
    other.goto(link)
    _wait_prediction(other, 0)
    _settled(other)
    assert other.evaluate("location.href") == link
    sel = [int(p.get_attribute("data-index")) for p in other.locator(".patch.sel").all()]
    assert sel == [5]
    again = other.locator(f"[data-testid=feature][data-feature='{feature}']")
    assert again.get_by_test_id("slider").input_value() == "-5"
    assert "edited" in again.get_attribute("class")
    assert _shown(other, "after") == pytest.approx(after, abs=1e-6)

    shot = tmp_path / "explore.png"
    card.hover()  # its heat map over the image, as a person would look at it
    page.screenshot(path=shot)
    if os.environ.get("SAEV_EXPLORE_SCREENSHOT") and not os.environ.get("SAEV_EXPLORE_DEMO"):
        dest = Path(os.environ["SAEV_EXPLORE_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
    assert page.evaluate("window.saevErrors") == [] and chromium_tab.errors == []


def test_a_stale_prediction_is_dropped(chromium_tab, explore):
    """Hold the first slider move's answer until a later one is shown: when it finally comes,
    the page keeps the later one."""
    page, base = chromium_tab.page, explore["url"]
    key = _test_keys(base)[2]
    page.goto(f"{base}/?image={key}&where=image")
    card = page.get_by_test_id("feature").first
    card.wait_for()
    seq = _wait_prediction(page, 0)
    _settled(page)
    held = []

    def hold_first(route):
        if not held:
            held.append(route)  # answered below, late
        else:
            route.continue_()

    page.route("**/api/predict", hold_first)
    _slider_to(page, card, 0.0)  # -5: held
    for _ in range(500):  # Playwright calls the route handler while the test waits in it
        if held:
            break
        page.wait_for_timeout(20)
    _slider_to(page, card, 1.0)  # +5: answered at once
    late_seq = _wait_prediction(page, seq)
    shown = _shown(page, "after")
    feature = int(card.get_attribute("data-feature"))
    assert _query(page)["edits"] == f"{feature}:5"
    want = _post(
        f"{base}/api/predict",
        {"image": key, "edits": [{"feature": feature, "scale": 5}], "where": "image"},
    )
    assert shown == {r["class"]: r["prob"] for r in want["classification"]["after"]}
    assert len(held) == 1
    with page.expect_response("**/api/predict") as answer:
        held[0].continue_()
    assert answer.value.json()["seq"] < late_seq  # the held one is older ...
    page.wait_for_timeout(200)
    assert _shown(page, "after") == shown  # ... and was not drawn
    assert int(page.locator(PREDICTION).get_attribute("data-seq")) == late_seq
    assert chromium_tab.errors == []


def test_pick_by_label_at_random_and_by_upload(chromium_tab, explore, tmp_path):
    from PIL import Image

    page, base = chromium_tab.page, explore["url"]
    page.goto(base + "/")
    picker = page.get_by_test_id("image-picker")
    _wait_prediction(page, 0)
    assert _query(page)["image"].startswith("test:")  # the run's split by default
    # by label: the thumbnails are exactly the images the API lists with that label
    picker.locator("#label").select_option("red")
    _settled(page)
    listed = [r["key"] for r in json.loads(_get(f"{base}/api/images?split=test&label=red"))]
    thumbs = [t.get_attribute("data-key") for t in picker.locator(".thumb").all()]
    assert thumbs == listed and listed
    picker.locator(".thumb").last.click()
    _settled(page)
    assert _query(page)["image"] == listed[-1]
    # by id
    key = _test_keys(base)[3]
    picker.locator("#image-id").fill(key.split(":")[1])
    picker.locator("#open-id").click()
    _settled(page)
    assert _query(page)["image"] == key
    assert page.locator("#image").get_attribute("src").endswith(key.replace(":", "%3A") + ".png")
    # at random: some image of the split with that label
    picker.locator("#random").click()
    _settled(page)
    assert _query(page)["image"] in listed
    # a file that is no image: the server's reason is shown, nothing else changes
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    picker.locator("#upload").set_input_files(bad)
    _settled(page)
    assert "notes.png" in picker.locator("#pick-msg").text_content()
    assert "err" in picker.locator("#pick-msg").get_attribute("class")
    assert _query(page)["image"] in listed
    # a real image: opened under its upload key, features and prediction for it
    good = tmp_path / "mine.png"
    Image.fromarray(np.full((40, 48, 3), (200, 30, 30), np.uint8)).save(good)
    seq = int(page.locator(PREDICTION).get_attribute("data-seq"))
    picker.locator("#upload").set_input_files(good)
    _wait_prediction(page, seq)
    _settled(page)
    up = _query(page)["image"]
    assert up.startswith("upload:")
    assert page.get_by_test_id("feature").count() > 0
    # a drag along the top row selects it; reset clears the selection
    patches = page.get_by_test_id("patch")
    gw = json.loads(_get(f"{base}/api/info"))["grid"][1]
    first, last = patches.nth(0).bounding_box(), patches.nth(gw - 1).bounding_box()
    page.mouse.move(first["x"] + 3, first["y"] + 3)
    page.mouse.down()
    page.mouse.move(last["x"] + 3, last["y"] + 3, steps=2 * gw)
    page.mouse.up()
    assert _query(page)["patches"] == ",".join(map(str, range(gw)))
    page.locator("#reset-patches").click()
    assert "patches" not in _query(page) and page.locator(".patch.sel").count() == 0
    # the frequency filter: the cards are the API's top features within it
    page.locator("#max-freq").fill("0.05")
    page.locator("#max-freq").dispatch_event("change")
    _settled(page)
    want = _post(f"{base}/api/features", {"image": up, "patches": [], "n": 12, "max_freq": 0.05})
    assert page.locator("#max-freq").input_value() == "0.05"
    cards = page.get_by_test_id("feature").all()
    assert [int(c.get_attribute("data-feature")) for c in cards] == [
        f["feature"] for f in want["features"]
    ]
    assert all(f["frequency"] <= 0.05 for f in want["features"])
    unfiltered = _post(f"{base}/api/features", {"image": up, "patches": [], "n": 12})
    assert any(f["frequency"] > 0.05 for f in unfiltered["features"])  # the filter did filter
    # clicking a class shows images of it
    page.locator(f"{PREDICTION} .bar-row[data-side=before] .cls").first.click()
    name = page.locator(f"{PREDICTION} .bar-row[data-side=before]").first.get_attribute(
        "data-class"
    )
    _settled(page)
    examples = json.loads(_get(f"{base}/api/class/{name}/examples?limit=8"))
    got = [t.get_attribute("data-key") for t in page.locator("#examples .thumb").all()]
    assert got == [e["key"] for e in examples] and got
    # where: the whole image (CLS too) rather than the selected patches (none: every patch)
    card = page.get_by_test_id("feature").first
    feature = int(card.get_attribute("data-feature"))
    seq = int(page.locator(PREDICTION).get_attribute("data-seq"))
    _slider_to(page, card, 1.0)
    seq = _wait_prediction(page, seq)
    _settled(page)
    on_patches = _shown(page, "after")
    body = {"image": up, "edits": [{"feature": feature, "scale": 5}], "patches": []}
    api = _post(f"{base}/api/predict", {**body, "where": "selected"})
    assert on_patches == {r["class"]: r["prob"] for r in api["classification"]["after"]}
    page.locator("input[name=where][value=image]").check()
    seq = _wait_prediction(page, seq)
    _settled(page)
    assert _query(page)["where"] == "image" and _query(page)["edits"] == f"{feature}:5"
    api = _post(f"{base}/api/predict", {**body, "where": "image"})
    whole = {r["class"]: r["prob"] for r in api["classification"]["after"]}
    assert _shown(page, "after") == whole and whole != on_patches
    # log to MLflow: the app's callback (flows.explore.log_intervention) records this view
    import mlflow

    n = len(explore["logged"])
    page.locator("#log").click()
    page.locator("#log-link").wait_for()
    assert len(explore["logged"]) == n + 1
    assert explore["logged"][-1]["image"] == _query(page)["image"]
    run_id = page.locator("#log-link").text_content()
    mlflow.set_tracking_uri(explore["store"])
    run = mlflow.get_run(run_id)
    assert run.data.params["image"] == up and run.data.params["where"] == "image"
    assert run.data.params["edits"] == f"{feature}:5" and run.data.tags["stage"] == "explore"
    after = {r["class"]: r["prob"] for r in api["classification"]["after"]}
    for cls, prob in after.items():
        assert run.data.metrics[f"p_after.{cls}"] == pytest.approx(prob, abs=1e-9)
    saved = mlflow.artifacts.load_dict(f"runs:/{run_id}/intervention.json")
    assert saved["edits"] == [{"feature": feature, "scale": 5.0}] and saved["where"] == "image"
    assert saved["prediction"]["classification"]["after"] == api["classification"]["after"]
    assert page.locator("#log-link").get_attribute("href").endswith("workflowType=machine_learning")
    assert page.evaluate("window.saevErrors") == []
    # the one failed request the console shows is the bad upload's answer
    assert [e for e in chromium_tab.errors if "status of 400" not in e] == []
    assert len(chromium_tab.errors) == 1


@pytest.mark.skipif(
    not os.environ.get("SAEV_EXPLORE_DEMO"),
    reason="the demo run's picture for the README: `make screenshot` with the demo run built",
)
def test_screenshot_of_the_demo_run(chromium_tab, tmp_path, monkeypatch):
    """The README's picture: the page over the demo run (SAEV_EXPLORE_DEMO names its params
    file; its paths are relative to the repository), on the test image, feature and patches
    where setting the feature to -2 x its max activation moves a class most (among the first
    16 test images' top features within the page's default frequency filter)."""
    from fastapi.testclient import TestClient

    from saev_core.explore import create_app, load, parse_args, resolve_config

    monkeypatch.chdir(REPO)
    ex = load(resolve_config(parse_args(["--params", os.environ["SAEV_EXPLORE_DEMO"]])))
    app = create_app(ex, hosts=("testserver",))
    api = TestClient(app)
    scale, best = -2.0, None
    for img in api.get("/api/images", params={"limit": 16}).json():
        key = img["key"]
        body = {"image": key, "n": 6, "max_freq": MAX_FREQ}
        for f in api.post("/api/features", json=body).json()["features"]:
            patches = [i for i, v in enumerate(f["per_patch"]) if v > 0]
            edit = {"image": key, "patches": patches, "where": "selected",
                    "edits": [{"feature": f["feature"], "scale": scale}]}  # fmt: skip
            probs = api.post("/api/predict", json=edit).json()["classification"]["probs"]
            dp = float(np.abs(np.subtract(probs["after"], probs["before"])).max())
            if best is None or dp > best[0]:
                best = (dp, key, f["feature"], patches)
    dp, key, feature, patches = best
    assert dp > 0.5  # the edit visibly changes the answer
    page = chromium_tab.page
    with _serve(app) as base:
        edits = f"{feature}:{scale:g}"
        page.goto(f"{base}/?image={key}&patches={','.join(map(str, patches))}&edits={edits}")
        _wait_prediction(page, 0)
        _settled(page)
        before, after = _shown(page, "before"), _shown(page, "after")
        moved = max(abs(after.get(c, 0) - p) for c, p in before.items())
        assert moved > 0.3 or set(after) != set(before)
        card = page.locator(f"[data-testid=feature][data-feature='{feature}']")
        card.hover()  # its heat map over the image
        shot = tmp_path / "explore.png"
        page.screenshot(path=shot)
        assert page.evaluate("window.saevErrors") == [] and chromium_tab.errors == []
    dest = os.environ.get("SAEV_EXPLORE_SCREENSHOT")
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)


def test_an_untouched_slider_stands_at_the_features_current_value(chromium_tab, explore):
    """Not at 0 (that is an ablation): at the feature's code on the selected patch over its max
    activation (the API's per_patch and max_act), clamped and snapped to the slider's steps, and
    it stays untouched (no edit in the link) until moved."""
    page, base = chromium_tab.page, explore["url"]
    key = _test_keys(base)[1]
    page.goto(f"{base}/?image={key}")
    page.get_by_test_id("feature").first.wait_for()
    page.get_by_test_id("patch").nth(5).click()
    _settled(page)
    want = _post(f"{base}/api/features",
                 {"image": key, "patches": [5], "n": 12, "max_freq": MAX_FREQ})  # fmt: skip
    cards = page.get_by_test_id("feature")
    assert cards.count() == len(want["features"]) > 0
    lo, hi, step = -5.0, 5.0, 0.25
    nonzero = 0
    for card, f in zip(cards.all(), want["features"], strict=True):
        v = min(hi, max(lo, f["per_patch"][5] / f["max_act"]))
        snapped = lo + round((v - lo) / step) * step
        got = float(card.get_by_test_id("slider").input_value())
        assert got == pytest.approx(snapped, abs=1e-9), f["feature"]
        assert card.locator(".scale").text_content() == "untouched"
        nonzero += snapped != 0
    assert nonzero >= 1  # the top features fire on the patch they were chosen for
    assert "edits" not in _query(page)
