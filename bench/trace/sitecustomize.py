"""Records which of our files a Python process loaded, for bench/stage_deps.py.

Put this folder on PYTHONPATH and set SAEV_TRACE_IMPORTS to a folder; each process then writes
`<pid>.json` there at exit: its argv and the saev_core/ and flows/ files in `sys.modules`. It
changes nothing else. Without the variable it does nothing.
"""

import atexit
import json
import os
import sys

_OUT = os.environ.get("SAEV_TRACE_IMPORTS")


def _write() -> None:
    files = sorted(
        {
            m.__file__
            for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and (m.__name__.split(".")[0] in ("saev_core", "flows"))
        }
    )
    record = {"argv": sys.argv, "cwd": os.getcwd(), "files": files}
    path = os.path.join(_OUT, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


if _OUT:
    os.makedirs(_OUT, exist_ok=True)
    atexit.register(_write)
