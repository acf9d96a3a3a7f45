"""Test session set-up: never reach the network, never touch the user's Hugging Face cache."""

import atexit
import os
import shutil
import tempfile

# Before anything imports huggingface_hub: its constants are read at import time.
_HF_HOME = tempfile.mkdtemp(prefix="zoo-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
