"""The FastAPI app over an `Explorer` (`create_app`), its request bodies and the checks every
request passes (allowed Host names, same-site POSTs, bounded uploads). The page it serves,
`explore.html`, lies next to this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import Request  # module level: FastAPI resolves the endpoints' annotations here
from pydantic import BaseModel, Field

from saev_core.explore.config import LOOPBACK, MAX_UPLOAD_BYTES, ExploreError
from saev_core.explore.explorer import Explorer, _mib

PAGE = Path(__file__).with_name("explore.html")


# ---------------------------------------------------------------------------------------------
# the app


PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>saev explore</title>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>saev explore</h1><p>The page (saev_core/explore/explore.html) is not installed; the API is up:
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
