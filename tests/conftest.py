"""Suite-wide pytest setup.

* On a machine without CUDA, Triton kernels can only run in Triton's CPU interpreter, and
  ``TRITON_INTERPRET=1`` must be set before any module decorates a kernel (i.e. before the first
  ``import sla.ops.sla.triton`` anywhere in the session), so it is set here, ahead of every test module.
* Tests marked ``gpu`` need CUDA and are skipped without it.
"""

import importlib.util
import os

if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
