"""Shared fixtures of the unit tests.

Every test (and every module fixture) runs with one torch thread: the models here are tiny (one thread is fastest for them),
results do not depend on how many cores the machine has, and parallel test runs do not fight over
cores. The tests' tiny model configurations are named in `minimind_v.config` (`tiny_lm`,
`tiny_vision`, `tiny_vlm`), so no test keeps a copy of its own.
"""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches the code keeps between runs (the measured matmul peak, ...) go to a scratch folder."""
    old = os.environ.get("MINIMIND_V_CACHE")
    os.environ["MINIMIND_V_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MINIMIND_V_CACHE", None)
    else:
        os.environ["MINIMIND_V_CACHE"] = old

