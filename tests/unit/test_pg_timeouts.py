"""Every process group a run creates waits as long as the run's main group (runtime.DEFAULT_TIMEOUT, set by
MESHWRIGHT_PG_TIMEOUT_S): a group with a shorter timeout of its own failed a rank that a busy box had slowed while
the main group would still have waited."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import torch

from meshwright.parallel import expert_parallel
from meshwright.parallel.runtime import DEFAULT_TIMEOUT


def _groups_made(monkeypatch, **kwargs) -> list[tuple[list[int], timedelta]]:
    """The (members, timeout) of every group ep_groups_from_mesh creates on rank 0 of a dp4 mesh (ep 2)."""
    made: list[tuple[list[int], timedelta]] = []
    monkeypatch.setattr(expert_parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(expert_parallel.dist, "new_group",
                        lambda members, timeout: made.append((list(members), timeout)) or len(made))
    mesh = SimpleNamespace(mesh=torch.arange(4), mesh_dim_names=("dp",))
    groups = expert_parallel.ep_groups_from_mesh(mesh, "dp", 2, **kwargs)
    assert (groups.ep, groups.edp, groups.dp_size) == (1, 3, 4)  # rank 0's: [0, 1] and [0, 2]
    return made


def test_ep_groups_wait_as_long_as_the_runs_main_group(monkeypatch):
    made = _groups_made(monkeypatch)
    assert [m for m, _ in made] == [[0, 1], [2, 3], [0, 2], [1, 3]]
    assert {t for _, t in made} == {DEFAULT_TIMEOUT}  # was 120 s whatever the run's timeout


def test_an_explicit_ep_group_timeout_is_kept(monkeypatch):
    assert {t for _, t in _groups_made(monkeypatch, timeout_s=45)} == {timedelta(seconds=45)}
