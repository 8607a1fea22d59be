"""benchmarks/torch_api_audit.py on two tiny fake torch trees: what it must flag and what it must not."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import torch_api_audit as audit  # noqa: E402


def _tree(root: Path, files: dict[str, str]) -> audit.Tree:
    for rel, text in files.items():
        path = root / "torch" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return audit.Tree(root / "torch")


OLD = {
    "__init__.py": "from torch._ops import *\nfrom . import dist\n",
    "_ops.py": "def mm(a, b): ...\n",
    "dist/__init__.py": "from .api import DTensor\n",
    "dist/api.py": """
        class DTensor:
            def from_local(t, mesh=None, *, run_check=False): ...
            def to_local(self, *, grad_placements=None): ...
        def compile(model, backend='inductor'): ...
        """,
}
NEW = {
    "__init__.py": "from torch._ops import *\nfrom . import dist\n",
    "_ops.py": "def mm(a, b): ...\ndef scaled_mm(a, b, *, out_dtype=None): ...\n",
    "dist/__init__.py": "from .api import DTensor, compile\n",
    "dist/api.py": """
        class DTensor:
            def from_local(t, mesh=None, *, run_check=False, grad_placements=None): ...
            def to_local(self, *, grad_placements=None): ...
            def redistribute_async(self, *, async_op=True): ...
        def compile(model, backend=None): ...
        """,
}
OURS = """
import torch
from torch.dist import DTensor
import torch.dist as D

def f(x, y, mesh):
    torch.mm(x, y)
    torch.scaled_mm(x, y, out_dtype=None)
    DTensor.from_local(x, mesh, run_check=False, grad_placements=[1])
    D.api.compile(x)
    y.to_local(grad_placements=[1])
    y.redistribute_async(async_op=False)
"""


def test_audit_flags_new_names_kwargs_methods_and_defaults(tmp_path):
    old, new = _tree(tmp_path / "old", OLD), _tree(tmp_path / "new", NEW)
    src = tmp_path / "ours.py"
    src.write_text(OURS)
    report = audit.audit(old, new, audit.scan([src], tmp_path))
    names = {r["name"] for r in report["names"]}
    assert names == {"torch.scaled_mm"}  # torch.mm, DTensor.from_local, torch.dist.api.compile exist in both
    assert [(r["call"], r["kwarg"], r["where"]) for r in report["kwargs"]] == \
        [("torch.dist.DTensor.from_local", "grad_placements", "ours.py:9")]
    assert {(r["call"], r["kwarg"], tuple(r["old"]), tuple(r["new"])) for r in report["defaults"]} == \
        {("torch.dist.api.compile", "backend", ("'inductor'",), ("None",))}
    # y.to_local(grad_placements=) is in both trees; y.redistribute_async is a method the old tree has nowhere
    assert report["method_kwargs"] == []
    assert {r.get("attr") for r in report["new_identifiers"]} >= {"redistribute_async"}
    assert not any(r.get("attr") == "to_local" for r in report["new_identifiers"])


def test_method_kwargs_flags_a_keyword_the_old_method_lacks(tmp_path):
    old = _tree(tmp_path / "old", {"__init__.py": "class M:\n    def to_empty(self, *, device): ...\n"})
    new = _tree(tmp_path / "new", {"__init__.py": "class M:\n    def to_empty(self, *, device, recurse=True): ...\n"})
    src = tmp_path / "ours.py"
    src.write_text("def f(m):\n    m.to_empty(device='cpu', recurse=False)\n")
    report = audit.audit(old, new, audit.scan([src], tmp_path))
    assert report["method_kwargs"] == [{"method": "to_empty", "kwarg": "recurse", "where": "ours.py:2"}]


def test_cli_rejects_a_directory_without_torch_init(tmp_path, capsys):
    (tmp_path / "new" / "torch").mkdir(parents=True)
    (tmp_path / "new" / "torch" / "__init__.py").write_text("")
    assert audit.main(["--old", str(tmp_path), "--new", str(tmp_path / "new" / "torch"), str(tmp_path)]) == 2
    assert "no __init__.py" in capsys.readouterr().err
