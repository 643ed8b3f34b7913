"""The object store: an S3-compatible bucket that carries shards, stats and artifacts between
machines (DVC's remote, MLflow's artifact root, the warehouse's Parquet sources).

The project reaches it with the AWS clients' own configuration, so one set of environment
variables serves DVC (dvc-s3), MLflow, boto3 and s3fs alike:

| variable | what it says |
| --- | --- |
| `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (or `AWS_PROFILE`) | the credentials |
| `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) | a server other than AWS: MinIO, Ceph, moto |
| `SAEV_OBJECT_STORE` | `s3://bucket/prefix`, the bucket `saev doctor` checks |

Reading goes through s3fs (an fsspec filesystem): the warehouse registers it on its DuckDB
connection (`con.register_filesystem`), because DuckDB's own httpfs extension cannot be downloaded
on these machines. `probe` is what the doctor runs: reachable, bucket present, writable (a tiny
object put and deleted), each failure said in words.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMES = ("s3://", "s3a://")
OBJECT_STORE_ENV = "SAEV_OBJECT_STORE"
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's order


def is_url(path: str) -> bool:
    """Whether `path` names an object in the store (`s3://bucket/key`) rather than a file."""
    return str(path).startswith(SCHEMES)


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not is_url(url):
        raise ValueError(f"not an object-store URL (s3://bucket/prefix): {url!r}")
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    if not bucket:
        raise ValueError(f"object-store URL without a bucket: {url!r}")
    return bucket, prefix.strip("/")


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint: `explicit`, else the environment's, else None (AWS itself)."""
    if explicit:
        return explicit
    return next((os.environ[v] for v in ENDPOINT_ENVS if os.environ.get(v)), None)


# s3fs retries 5 times on top of botocore's own retries by default: minutes on a dead endpoint
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 5, 30, 3


def filesystem(endpoint: str | None = None) -> Any:
    """An s3fs filesystem on the store, with no listing cache (a rebuild sees new files) and
    bounded timeouts and retries (a dead endpoint fails in seconds, not minutes)."""
    import s3fs

    url = endpoint_url(endpoint)
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": url} if url else {},
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"total_max_attempts": ATTEMPTS},
        },
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    fs.retries = 2  # s3fs's own retry loop (a class attribute, 5 by default)
    return fs


def glob(fs: Any, pattern: str) -> list[str]:
    """The objects matching an `s3://` glob, as `s3://` URLs (fsspec drops the scheme). A store
    that cannot be listed raises OSError naming the endpoint and what to check."""
    scheme = pattern.split("://", 1)[0]
    try:
        found = fs.glob(pattern)
    except Exception as e:  # botocore, aiohttp and fsspec each raise their own kinds
        where = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or "AWS S3"
        raise OSError(
            f"cannot list {pattern} at {where}: {type(e).__name__}: {e} (check the endpoint, the "
            f"bucket and the credentials: SAEV_OBJECT_STORE=s3://<bucket> saev doctor)"
        ) from e
    return [f"{scheme}://{p}" for p in found]


@dataclass(frozen=True)
class Probe:
    """What `probe` found out about one bucket."""

    url: str
    """The `s3://bucket/prefix` probed."""
    endpoint: str | None
    """The endpoint it was reached at (None: AWS's own)."""
    bucket: str
    """The bucket."""
    credentials: bool
    """Some credentials were found (environment, profile or instance role)."""
    reachable: bool
    """The endpoint answered."""
    bucket_exists: bool
    """The bucket is there (and these credentials may see it)."""
    writable: bool
    """A probe object could be written under the prefix, and deleted."""
    problem: str | None
    """What is missing or wrong, in words; None when all is well."""


SESSION_SETTINGS = {
    "access_key_id": "aws_access_key_id",
    "secret_access_key": "aws_secret_access_key",
    "session_token": "aws_session_token",
    "profile": "profile_name",
    "region": "region_name",
}
"""DVC's names for an S3 remote's own settings (`dvc remote modify NAME KEY VALUE`) -> boto3's
Session arguments; `credentialpath` and `configpath` are the files botocore reads instead."""
SESSION_FILES = {"credentialpath": "credentials_file", "configpath": "config_file"}


def session(settings: dict[str, str] | None = None) -> Any:
    """A boto3 session from the environment's AWS settings, or from `settings` (DVC's keys:
    `SESSION_SETTINGS`, `SESSION_FILES`) where given, as dvc-s3 builds its own."""
    import boto3
    import botocore.session

    settings = {k: v for k, v in (settings or {}).items() if v}
    unknown = set(settings) - set(SESSION_SETTINGS) - set(SESSION_FILES)
    if unknown:
        raise ValueError(
            f"unknown S3 settings {sorted(unknown)}; known: "
            f"{sorted(SESSION_SETTINGS) + sorted(SESSION_FILES)}"
        )
    core = botocore.session.Session()
    for key, variable in SESSION_FILES.items():
        if key in settings:
            core.set_config_variable(variable, str(Path(settings[key]).expanduser()))
    given = {SESSION_SETTINGS[k]: v for k, v in settings.items() if k in SESSION_SETTINGS}
    return boto3.session.Session(botocore_session=core, **given)


def probe(
    url: str,
    endpoint: str | None = None,
    timeout: float = 3.0,
    settings: dict[str, str] | None = None,
) -> Probe:
    """Check the bucket of `url` the way a push would meet it: credentials, endpoint, bucket, and
    a put + delete of a tiny object under the prefix. Short timeouts and no retries, so a dead
    endpoint costs seconds. `settings`: a DVC remote's own credentials, profile or region
    (`session`), used instead of the environment's."""
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_url(url)
    endpoint = endpoint_url(endpoint)
    where = endpoint or "AWS S3"

    session_ = session(settings)
    credentials = session_.get_credentials() is not None

    def result(reachable=False, exists=False, writable=False, problem=None) -> Probe:
        return Probe(url, endpoint, bucket, credentials, reachable, exists, writable, problem)

    if not credentials:
        return result(
            problem="no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    client = session_.client(
        "s3",
        endpoint_url=endpoint,
        region_name=session_.region_name or "us-east-1",
        # total_max_attempts 1: one attempt, no retry ("max_attempts" counts retries)
        config=Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1}
        ),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return result(True, problem=f"bucket {bucket!r} does not exist at {where}")
        if code in ("301", "PermanentRedirect"):
            return result(
                True,
                problem=f"bucket {bucket!r} lives in another region than {where} "
                "(set AWS_DEFAULT_REGION or the endpoint of its region)",
            )
        if code in ("403", "AccessDenied", "Forbidden"):
            return result(True, problem=f"bucket {bucket!r} at {where}: access denied ({code})")
        return result(True, problem=f"bucket {bucket!r} at {where}: {code or e}")
    except BotoCoreError as e:
        return result(problem=f"{where} does not answer: {e}")
    key = "/".join(p for p in (prefix, f".saev-doctor-probe-{uuid.uuid4().hex}") if p)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"saev doctor probe\n")
        client.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as e:
        return result(True, True, problem=f"cannot write s3://{bucket}/{key}: {e}")
    return result(True, True, True)
