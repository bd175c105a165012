"""Suite-wide pytest setup.

* On a machine without CUDA, Triton kernels can only run in Triton's CPU interpreter, and
  ``TRITON_INTERPRET=1`` must be set before any module decorates a kernel (i.e. before the first
  ``import sla.ops.sla.triton`` anywhere in the session), so it is set here, ahead of every test module.
  With the interpreter on, its NumPy >= 2.4 incompatibility is patched here too
  (``sla.ops.sla.triton.testing.patch_triton_interpreter``): the test setup's business, not the library's.
* Tests marked ``gpu`` need CUDA and are skipped without it.
"""

import importlib.util
import os

if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        from sla.ops.sla.triton.testing import patch_triton_interpreter

        patch_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
