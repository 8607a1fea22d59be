"""Fixtures shared by unit tests."""

from __future__ import annotations

import gc
import os

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group over an in-memory store, destroyed after a gc (teardown order tests: what the test left
    alive must be freed before the group goes). Modules that need another scope or store define their own."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
