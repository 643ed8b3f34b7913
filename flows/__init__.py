"""Prefect flows, one per pipeline stage; `pipeline.py` chains them, `deploy.py` schedules them."""

import os

# Offline, quiet defaults for Prefect's temporary local server (STACK.md: analytics cause
# "database is locked" noise; the default 20 s start-up timeout is tight on 2 loaded cores).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
