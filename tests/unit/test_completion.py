"""`meshwright completion bash|zsh`: the script is generated from the parser and completes subcommands,
nested subcommands, options and option choices when a real bash (and zsh via bashcompinit) runs it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from meshwright.cli import build_parser, main
from meshwright.commands.completion import tables

CASES = [
    (["meshwright", "pl"], "plan"),
    (["meshwright", ""], "data train profile plan launch report export completion"),
    (["meshwright", "plan", "--em"], "--emit"),
    (["meshwright", "plan", "--model", "llama2-7b", "--emit", ""], "megatron deepspeed torchtitan"),
    (["meshwright", "profile", ""], "hardware model"),
    (["meshwright", "profile", "model", "--dev"], "--device"),
    (["meshwright", "plan", "--zero", ""], "0 1 2 3"),
    (["meshwright", "completion", ""], "bash zsh"),
]

HARNESS = {
    "bash": 't() { COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); _meshwright; '
            'echo "${COMPREPLY[*]}"; }',
    # as zsh's bashcompinit calls a bash completion function: inside compgen, under `emulate -L sh`
    "zsh": 't() { emulate -L sh; setopt kshglob noshglob braceexpand nokshautoload; local -a COMP_WORDS COMPREPLY; '
           'COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _meshwright; echo "${COMPREPLY[*]}"; }',
}


def _script(shell: str, capsys) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def test_script_is_generated_from_the_parser(capsys):
    text = _script("bash", capsys)
    t = tables(build_parser())
    assert t["words"]["_"].split() == ["data", "train", "profile", "plan", "launch", "report", "export", "completion"]
    assert "--train-config" in t["opts"]["_ plan"] and t["choices"]["_ plan --emit"] == "megatron deepspeed torchtitan"
    assert "complete -o filenames -F _meshwright meshwright" in text and "--train-config" in text


def test_unknown_shell_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["completion", "fish"])
    assert exc.value.code == 2 and "invalid choice: 'fish'" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completes_in_a_real_shell(shell, capsys, tmp_path):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    script = tmp_path / f"meshwright.{shell}"
    script.write_text(_script(shell, capsys))
    lines = [f"source {script}", HARNESS[shell]]
    lines += ["t " + " ".join(f"'{w}'" for w in words) for words, _ in CASES]
    out = subprocess.run([exe, "-f"] if shell == "zsh" else [exe, "--norc", "--noprofile"], input="\n".join(lines),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = out.stdout.splitlines()
    for (words, want), line in zip(CASES, got, strict=True):
        if shell == "zsh" and words[-1]:
            # zsh's compgen leaves matching the typed prefix to compadd: the candidates must include the answer
            assert set(want.split()) <= set(line.split()), (words, line)
        else:
            assert line == want, (words, line)
