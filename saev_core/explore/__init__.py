"""`saev explore`: an interactive app over one run (patches -> features -> sliders -> prediction).

The back end of the page `explore.html` (next to `app.py`): a FastAPI app over one run, i.e.
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

Submodules (command -> app -> explorer -> config, state; never the other way):

- `config`: `ExploreConfig`, `resolve_config` (defaults from params.yaml), the limits above,
  `ExploreError` and the start-up checks of a run's paths.
- `state`: the fast path (`resume_after`, `returns_tuple`), the per-image state, `HeatMaps`.
- `explorer`: `Explorer`, the run and every answer the API gives.
- `app`: `create_app`, the request bodies and checks, `PAGE` (`explore.html`, beside it).
- `command`: the command line: `parse_args`, `load`, `main`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.explore)

from .app import PAGE, allowed_hosts, create_app
from .command import load, main, parse_args
from .config import ExploreConfig, ExploreError, resolve_config
from .explorer import Explorer
from .state import HeatMaps, resume_after, returns_tuple
