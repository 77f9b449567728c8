import os

import pytest
import torch

# Tests must never touch the user's real cache or take every core.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    if "DYNLM_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("DYNLM_CACHE", str(tmp_path_factory.getbasetemp() / "dynlm-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
