"""What the build of ``convrec._C`` recorded: which parts (CPU, CUDA) were built, against which
torch, and why a part is missing. setup.py writes ``_build_status.json`` beside this module at
build time because pip hides a successful build's output, warnings included; the runtime shows
:func:`warning` at first use instead. No torch import here.
"""

from __future__ import annotations

import json
from pathlib import Path

STATUS_FILE = Path(__file__).with_name("_build_status.json")


def read() -> dict | None:
    """The recorded status, or None when there is none (a checkout never built, or a build by
    an older setup.py). Keys: ``torch`` (version built against, or None), ``min_torch``,
    ``parts`` ({"cpu"|"cuda": {"state": "built"|"failed"|"skipped"|"not built", "detail"}}) and
    ``warning``."""
    try:
        status = json.loads(STATUS_FILE.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def warning() -> str | None:
    """The one-line warning of the build (a part the user would expect is missing, and why), or
    None when everything expected was built or nothing was recorded."""
    status = read()
    message = status.get("warning") if status else None
    return message if isinstance(message, str) and message else None
