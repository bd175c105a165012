"""Which code a benchmark measured: the commit, marked ``-dirty`` when tracked files differ from it.

``SLA_COMMIT`` overrides the lookup: set it when the tree was copied to a machine whose git metadata is
stale or absent (the GPU machine receives a copy of the working tree; its ``.git`` once reported an older
commit than the one measured, see bench/RESULTS.md).
"""

from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    if os.environ.get("SLA_COMMIT"):
        return os.environ["SLA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=here,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True,
                                        cwd=here, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
