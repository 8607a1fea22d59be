import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The signal tests need Ctrl-C and hang-up to act in this process and in the runs it starts. A suite started with
# `nohup` or as a background job of a non-interactive shell ignores SIGHUP/SIGINT, and children inherit an ignored
# signal: those tests then fail for the way pytest was started, not for the code. Restore the defaults.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# Launches several modules share (tests/distributed/conftest.py): under pytest-xdist a session fixture runs once per
# worker that needs it, so the modules sharing one are kept on one worker
SHARED_LAUNCHES = ("cli_launch", "worker_launch")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) each test module runs whole on one worker, its
    module-scoped launch once; the modules of one shared launch run on one worker together. Without xdist the marks
    do nothing. tryfirst: the marks must be on the items before xdist's own hook reads them into the ids it
    schedules by (:func:`_xdist_groups_take`)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    shared: dict[str, str] = {}
    for item in items:
        for launch in SHARED_LAUNCHES:
            if launch in getattr(item, "fixturenames", ()):
                shared.setdefault(item.nodeid.split("::")[0], launch)
    for item in items:
        module = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(shared.get(module, module)))


def _xdist_groups_take() -> bool:
    """Whether pytest reads back the id xdist's ``--dist loadgroup`` writes: xdist appends each test's group to
    ``item._nodeid``, and pytest 9.2 builds ``nodeid`` from ``_id`` instead, so every test was scheduled alone and
    each worker ran the launches of every module it touched (the 4-rank parity and MoE launches twice a CI run)."""
    probe = object.__new__(type("Probe", (pytest.Item,), {"runtest": lambda self: None}))
    probe._nodeid = "probe@group"
    try:
        return probe.nodeid == "probe@group"
    except AttributeError:
        return False


def pytest_configure(config):
    if config.getoption("dist", "no") == "loadgroup" and not _xdist_groups_take():
        raise pytest.UsageError(f"--dist loadgroup would not group tests under pytest {pytest.__version__} (xdist "
                                "writes the group into Item._nodeid, which it no longer reads): install the test "
                                "extras with -c constraints.txt, which pins a pytest that does")


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """A test's timeout (pytest-timeout's, a quiet box's bound) stretched by the box's load at the test's start
    (tests/patience.py): on a quiet box (CI) unchanged, on a loaded one a slow test is not killed as a hung one."""
    import pytest_timeout
    from patience import stretch

    factor = stretch()
    if factor <= 1:
        return None  # pytest-timeout's own timer, as set
    return pytest_timeout.pytest_timeout_set_timer(item, settings._replace(timeout=settings.timeout * factor))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from 2 intra-op threads, and on a busy box OpenMP barriers make 2 threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    """`--plan auto` caches its profiles; tests keep theirs out of the user's home (and share them per session)."""
    os.environ.setdefault("MESHWRIGHT_CACHE_DIR", str(tmp_path_factory.mktemp("profile-cache")))
    yield


@pytest.fixture(autouse=True, scope="session")
def _torchrun_logs(tmp_path_factory):
    """run_torchrun keeps a failed launch's per-rank logs under this session's temp directory (helpers.py)."""
    import helpers

    helpers.TMP_FACTORY = tmp_path_factory
    yield
    helpers.TMP_FACTORY = None
