"""``meshwright launch`` checks ``lora.init_adapter`` before any host starts (commands/train.py ``preflight``,
train/peft_init.py ``preflight_init_adapter``): what every rank would refuse at build is refused once, in one line,
where the launch host has the path; a path this host does not have is said in one note line and left to the ranks;
a resume with a checkpoint to load does not look at the adapter at all (the ranks never read it then)."""

from __future__ import annotations

import json

import pytest

from _train_helpers import one_line_error


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("n0 slots=2\nn1 slots=2\n")
    return path


def _adapter(root, r=8, files=("adapter_model.safetensors",)):
    """An adapter directory as far as the launch host's checks read it: PEFT's config and the weights file named."""
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                          "target_modules": ["q_proj"],
                                                          "base_model_name_or_path": "/hosts/base"}))
    for f in files:
        (root / f).write_bytes(b"")
    return root


def _argv(hosts, adapter, *train):
    # init_from on the hosts' disks only: the adapter alone is checked here, its base by the ranks
    return ["launch", "--hosts", str(hosts), "--dry-run", "--", "train", "tiny-test", "init_from=/hosts/base",
            f"lora={{rank: 4, alpha: 8, targets: [wq], init_adapter: {adapter}}}", *train]


@pytest.mark.parametrize("case,needle", [
    ("rank", "lora.rank=4 is invalid; valid: 8, the adapter's"),
    ("file", "is invalid; valid: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors); it is a "
             "file"),
    ("pickle", "an adapter saved as safetensors (adapter_model.safetensors); it holds adapter_model.bin, a pickle"),
])
def test_a_bad_adapter_the_launch_host_has_is_refused_before_any_host_starts(capsys, hosts, tmp_path, case, needle):
    adapter = {"rank": lambda: _adapter(tmp_path / "a"), "file": lambda: hosts,
               "pickle": lambda: _adapter(tmp_path / "a", r=4, files=("adapter_model.bin",))}[case]()
    line = one_line_error(capsys, _argv(hosts, adapter))
    assert needle in line and line.startswith("meshwright launch: error:")
    assert "ssh" not in capsys.readouterr().out  # no host command was printed


def test_an_adapter_path_the_launch_host_lacks_is_one_note_and_left_to_the_ranks(capsys, hosts, tmp_path):
    from meshwright.cli import main

    assert main(_argv(hosts, tmp_path / "on-the-hosts")) == 0
    out = capsys.readouterr()
    notes = [ln for ln in out.err.splitlines() if "init_adapter" in ln]
    assert notes == [f"meshwright launch: note: lora.init_adapter={str(tmp_path / 'on-the-hosts')!r} is not on this "
                     f"host: each host's ranks check it on their own disks (a missing or bad adapter stops them there, "
                     f"in one line)"]
    assert out.out.count("ssh ") == 2  # both hosts' commands


def test_a_good_adapter_passes_and_a_resume_does_not_look_at_it(capsys, hosts, tmp_path):
    from meshwright.cli import main

    assert main(_argv(hosts, _adapter(tmp_path / "good", r=4))) == 0
    assert "init_adapter" not in capsys.readouterr().err
    # a resume from a checkpoint loads the checkpoint's adapters: the ranks never read init_adapter, nor does launch
    assert main(_argv(hosts, hosts, "--resume-from", str(tmp_path / "ckpt" / "step_000001"))) == 0
    assert "init_adapter" not in capsys.readouterr().err
