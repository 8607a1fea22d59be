"""Every flag `meshwright launch` gives each host's torchrun is one this torch's torchrun parses, to the values meant.

Why: the hosts run the torchrun of their own torch, and the GPU image's is 2.11 while development runs 2.13; a flag
2.11 lacks (``--shutdown-timeout`` is one: launcher/remote/argv.py sets its variable instead) makes torchrun exit 2
on every host, which a GPU session finds only after its machine has started. Parsed by the consumer itself
(``torch.distributed.run.parse_args`` and ``config_from_args``), so the check runs under whichever torch runs the
tests: CI's, and ``benchmarks/torch_compat.sh``'s 2.11."""

from __future__ import annotations

import pytest

from meshwright.launcher.remote.argv import TORCHRUN_SIGNALS, LaunchSpec, torchrun_argv
from meshwright.launcher.remote.hostfile import Host

run = pytest.importorskip("torch.distributed.run")


def _parsed(spec: LaunchSpec, node_rank: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it in this process when unset
    argv = torchrun_argv(spec, node_rank)
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    args = run.parse_args(argv[3:])  # argparse exits 2 on a flag this torchrun does not know
    config, cmd, cmd_args = run.config_from_args(args)
    return args, config, cmd_args


@pytest.mark.parametrize("max_restarts", [0, 2], ids=["static", "c10d"])
def test_each_hosts_torchrun_parses_the_launch_flags(max_restarts, monkeypatch):
    hosts = [Host("node0", 2), Host("node1", 4)]
    spec = LaunchSpec(hosts=hosts, train_args=["train", "tiny-test", "steps=2"], python="python3",
                      max_restarts=max_restarts, rdzv_port=29411)
    spec.validate()
    for rank, host in enumerate(hosts):
        args, config, cmd_args = _parsed(spec, rank, monkeypatch)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, host.slots)
        assert config.max_restarts == max_restarts
        assert config.signals_to_handle == TORCHRUN_SIGNALS  # SIGUSR1/SIGUSR2 reach the ranks (Slurm's --signal)
        assert args.module and args.training_script == "meshwright.cli"
        assert cmd_args[-3:] == ["train", "tiny-test", "steps=2"]
        if max_restarts:  # elastic: c10d on the first host, this launch's id
            assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "node0:29411"
            assert config.run_id == spec.run_id
        else:  # static: node ranks in hostfile order, the master on the first host
            assert config.rdzv_backend == "static" and args.node_rank == rank
            assert (args.master_addr, args.master_port) == ("node0", 29411)


def test_a_users_pet_signals_to_handle_is_left_to_torchrun(monkeypatch):
    spec = LaunchSpec(hosts=[Host("node0", 1)], train_args=["train", "tiny-test"], env={"PET_SIGNALS_TO_HANDLE": "SIGTERM"})
    assert not any(a.startswith("--signals-to-handle") for a in torchrun_argv(spec, 0))
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")  # what the host's environment (the --env file) holds
    _, config, _ = _parsed(spec, 0, monkeypatch)
    assert config.signals_to_handle == "SIGTERM"
