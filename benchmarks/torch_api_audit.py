"""Which torch APIs our sources use that an older torch (the GPU image's) lacks or spells differently.

Why: the GPU machine runs an older torch than this machine, and GPU time is too short to spend on an
AttributeError. This reads two unpacked torch source trees (no import of either: the old one is a CUDA wheel
that cannot load here) and reports, for every `torch.` name our code reaches (through `import torch.x as y`,
`from torch.x import y` too):
  - dotted names that resolve in the new tree but not in the old one;
  - keyword arguments we pass that the old function's signature lacks (when both trees define it in Python
    or in a .pyi stub), and defaults that changed between the trees;
  - attribute / keyword names used anywhere in our code (methods on tensors, modules, optimizers, config keys)
    that the new tree defines somewhere and the old tree defines nowhere.
Static, so it over-reports: every line is a lead to read, not a verdict.

  python benchmarks/torch_api_audit.py --old /tmp/t211/src/torch --new .venv/.../site-packages/torch \
      meshwright benchmarks/gpu_check.py tests/unit/test_fp8_tp.py
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class Use:
    """One reach into torch: the dotted name, where, and the keywords passed when it is called."""

    name: str
    where: str
    kwargs: tuple[str, ...] = ()
    called: bool = False


@dataclass
class Tree:
    """One unpacked torch package (the directory that holds torch/__init__.py)."""

    root: Path
    _ast: dict[Path, ast.Module | None] = field(default_factory=dict)

    def module_path(self, dotted: str) -> Path | None:
        rel = Path(*dotted.split("."))
        base = self.root.parent / rel
        for cand in (base / "__init__.py", base.with_suffix(".py"), base / "__init__.pyi", base.with_suffix(".pyi")):
            if cand.is_file():
                return cand
        return None

    def parse(self, path: Path) -> ast.Module | None:
        if path not in self._ast:
            try:
                self._ast[path] = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                self._ast[path] = None
        return self._ast[path]

    def stub_of(self, path: Path) -> Path | None:
        stub = path.with_suffix(".pyi")
        return stub if stub.is_file() and stub != path else None


def _top_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, looking inside if/try/with blocks (version switches) but not defs."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for sub in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, sub, []) or []:
                    if isinstance(child, ast.ExceptHandler):
                        yield from _top_statements(child.body)
                    else:
                        yield from _top_statements([child])


def _targets(node: ast.stmt) -> list[str]:
    out: list[str] = []
    if isinstance(node, ast.Assign):
        for t in node.targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    out.append(n.id)
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        out.append(node.target.id)
    return out


def _resolve_from(modname: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = modname.split(".")
    base = parts[: len(parts) - node.level + (1 if _is_pkg_name(modname) else 0)]
    return ".".join(base + ([node.module] if node.module else []))


_PKGS: set[str] = set()


def _is_pkg_name(modname: str) -> bool:
    return modname in _PKGS


def lookup(tree: Tree, modname: str, name: str, depth: int = 0) -> tuple[str, object]:
    """Where `modname.name` comes from in `tree`: ("module", dotted) / ("def", (path, node)) / ("class", ...)
    / ("value", None) / ("missing", None) / ("dynamic", None) (a module __getattr__ or star import we cannot follow)."""
    if depth > 8:
        return ("dynamic", None)
    sub = tree.module_path(f"{modname}.{name}")
    if sub is not None:
        return ("module", f"{modname}.{name}")
    path = tree.module_path(modname)
    if path is None:
        return ("missing", None)
    if path.name.startswith("__init__"):
        _PKGS.add(modname)
    dynamic = False
    for p in [path] + ([tree.stub_of(path)] if tree.stub_of(path) else []):
        mod = tree.parse(p)
        if mod is None:
            continue
        for node in _top_statements(mod.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name == name:
                    return ("def", (p, node))
                if node.name == "__getattr__":
                    dynamic = True
            elif isinstance(node, ast.ClassDef) and node.name == name:
                return ("class", (p, node))
            elif name in _targets(node):
                return ("value", None)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        return ("module", a.name if a.asname else a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                src = _resolve_from(modname, node)
                for a in node.names:
                    if a.name == "*":
                        if src.startswith("torch"):
                            kind, obj = lookup(tree, src, name, depth + 1)
                            if kind not in ("missing", "dynamic"):
                                return (kind, obj)
                        dynamic = dynamic or not src.startswith("torch")
                    elif (a.asname or a.name) == name:
                        if tree.module_path(f"{src}.{a.name}") is not None:
                            return ("module", f"{src}.{a.name}")
                        kind, obj = lookup(tree, src, a.name, depth + 1)
                        return (kind, obj) if kind != "missing" else ("value", None)
        # globals()[...] = ... / __all__ built in loops: torch/__init__.py re-exports _C's functions this way
        if any(isinstance(n, ast.Name) and n.id == "globals" for n in ast.walk(mod)):
            dynamic = True
    return ("dynamic", None) if dynamic else ("missing", None)


def resolve(tree: Tree, dotted: str) -> tuple[str, object]:
    """Resolve a dotted torch name; attributes of a class are looked up in its body (and marked dynamic if the
    class has bases we do not follow)."""
    parts = dotted.split(".")
    kind, obj = ("module", parts[0])
    for part in parts[1:]:
        if kind == "module":
            kind, obj = lookup(tree, str(obj), part)
        elif kind == "class":
            path, cls = obj  # type: ignore[misc]
            found = None
            for node in cls.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == part:
                    found = ("def", (path, node))
                elif isinstance(node, ast.ClassDef) and node.name == part:
                    found = ("class", (path, node))
                elif part in _targets(node):
                    found = ("value", None)
            if found is None:
                return ("dynamic", None) if cls.bases or cls.keywords else ("missing", None)
            kind, obj = found
        else:
            return ("dynamic", None)  # attribute of a value/function: not followed
        if kind in ("missing", "dynamic"):
            return (kind, obj)
    return (kind, obj)


def signature(node: ast.FunctionDef) -> tuple[set[str], bool, dict[str, str]]:
    a = node.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    defaults: dict[str, str] = {}
    pos = a.posonlyargs + a.args
    for arg, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
        defaults[arg.arg] = ast.unparse(d)
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        if d is not None:
            defaults[arg.arg] = ast.unparse(d)
    return names, a.kwarg is not None, defaults


def all_defs(tree: Tree, kind: str, obj: object) -> list[ast.FunctionDef]:
    """The def(s) behind a resolved name: a function (all its @overload stubs too) or a class's __init__."""
    if kind == "def":
        path, node = obj  # type: ignore[misc]
        mod = tree.parse(path)
        same = [n for n in ast.walk(mod) if isinstance(n, ast.FunctionDef) and n.name == node.name] if mod else []
        return same or [node]
    if kind == "class":
        _, cls = obj  # type: ignore[misc]
        return [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__")]
    return []


class Collector(ast.NodeVisitor):
    """Dotted torch names (with call keywords) and every attribute / keyword name used in one file."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.alias: dict[str, str] = {}
        self.uses: list[Use] = []
        self.attrs: dict[str, list[str]] = {}
        self.kwargs: dict[str, list[str]] = {}
        self.method_kwargs: list[tuple[str, tuple[str, ...], str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "torch":
                if a.asname:
                    self.alias[a.asname] = a.name
                else:
                    self.alias["torch"] = "torch"
                self.uses.append(Use(a.name, f"{self.rel}:{node.lineno}"))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] == "torch" and not node.level:
            for a in node.names:
                self.alias[a.asname or a.name] = f"{node.module}.{a.name}"
                self.uses.append(Use(f"{node.module}.{a.name}", f"{self.rel}:{node.lineno}"))

    def _dotted(self, node: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.alias:
            return ".".join([self.alias[node.id]] + parts[::-1])
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attrs.setdefault(node.attr, []).append(f"{self.rel}:{node.lineno}")
        dotted = self._dotted(node)
        if dotted is not None:
            self.uses.append(Use(dotted, f"{self.rel}:{node.lineno}"))
            return  # the inner chain is a prefix of this one
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        kws = tuple(k.arg for k in node.keywords if k.arg)
        for k in kws:
            self.kwargs.setdefault(k, []).append(f"{self.rel}:{node.lineno}")
        dotted = self._dotted(node.func) if isinstance(node.func, (ast.Attribute, ast.Name)) else None
        if dotted is not None:
            self.uses.append(Use(dotted, f"{self.rel}:{node.lineno}", kws, called=True))
        elif dotted is None and kws and isinstance(node.func, ast.Attribute):
            self.method_kwargs.append((node.func.attr, kws, f"{self.rel}:{node.lineno}"))
        self.generic_visit(node)


def defined_names(tree: Tree) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """Every name a tree defines anywhere (defs, classes, assigned names and attributes), every parameter name,
    and per def name the union of its parameter names ("*" where some def of that name takes **kwargs)."""
    names: set[str] = set()
    params: set[str] = set()
    by_def: dict[str, set[str]] = {}
    for path in tree.root.rglob("*.py*"):
        if path.suffix not in (".py", ".pyi"):
            continue
        mod = tree.parse(path)
        if mod is None:
            continue
        for n in ast.walk(mod):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
                if not isinstance(n, ast.ClassDef):
                    a = n.args
                    own = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | ({"*"} if a.kwarg else set())
                    params.update(own)
                    by_def.setdefault(n.name, set()).update(own)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                names.add(n.attr)
            elif isinstance(n, ast.alias):
                names.add(n.asname or n.name.split(".")[-1])
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
                names.add(n.value)  # __all__ entries, setattr / register names, config keys in dicts
            elif isinstance(n, ast.keyword) and n.arg:
                params.add(n.arg)
    return names, params, by_def


def scan(paths: list[Path], base: Path) -> list[Collector]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    out = []
    for f in files:
        c = Collector(str(f.resolve().relative_to(base)))
        c.visit(ast.parse(f.read_text(encoding="utf-8")))
        out.append(c)
    return out


def audit(old: Tree, new: Tree, cols: list[Collector]) -> dict[str, list[dict]]:
    report: dict[str, list[dict]] = {"names": [], "kwargs": [], "defaults": [], "unresolved_old": [],
                                     "method_kwargs": [], "new_identifiers": []}
    seen: set[tuple] = set()
    for c in cols:
        for u in c.uses:
            ko, oo = resolve(old, u.name)
            kn, on = resolve(new, u.name)
            key = (u.name, ko, kn)
            if ko == "missing" and kn != "missing" and key not in seen:
                report["names"].append({"name": u.name, "where": u.where, "new": kn})
            elif ko == "dynamic" and kn not in ("missing", "dynamic") and key not in seen:
                report["unresolved_old"].append({"name": u.name, "where": u.where, "new": kn})
            seen.add(key)
            if not u.called:
                continue
            dold, dnew = all_defs(old, ko, oo), all_defs(new, kn, on)
            if not dold or not dnew:
                continue
            sold = [signature(d) for d in dold]
            snew = [signature(d) for d in dnew]
            old_names = set().union(*(s[0] for s in sold))
            old_var = any(s[1] for s in sold)
            for k in u.kwargs:
                if k not in old_names and not old_var:
                    report["kwargs"].append({"call": u.name, "kwarg": k, "where": u.where})
                dn = {s[2][k] for s in snew if k in s[2]}
                do = {s[2][k] for s in sold if k in s[2]}
                if dn and do and dn != do:
                    report["defaults"].append({"call": u.name, "kwarg": k, "old": sorted(do), "new": sorted(dn), "where": u.where})
            # defaults of the arguments we do NOT pass that changed
            for k in set().union(*(s[2].keys() for s in snew)) - set(u.kwargs):
                dn = {s[2][k] for s in snew if k in s[2]}
                do = {s[2][k] for s in sold if k in s[2]}
                if dn and do and dn != do and (u.name, k) not in seen:
                    seen.add((u.name, k))
                    report["defaults"].append({"call": u.name, "kwarg": k, "old": sorted(do), "new": sorted(dn), "where": u.where, "passed": False})
    old_names, old_params, old_defs = defined_names(old)
    new_names, new_params, new_defs = defined_names(new)
    for c in cols:
        for meth, kws, where in c.method_kwargs:  # x.meth(k=...): k taken by some new `def meth`, by no old one
            if meth not in old_defs or "*" in old_defs[meth]:
                continue
            for k in kws:
                if k in new_defs.get(meth, ()) and k not in old_defs[meth]:
                    report["method_kwargs"].append({"method": meth, "kwarg": k, "where": where})
        for attr, wheres in c.attrs.items():
            if attr in new_names and attr not in old_names:
                report["new_identifiers"].append({"attr": attr, "where": wheres[:3]})
        for kw, wheres in c.kwargs.items():
            if kw in new_params and kw not in old_params and kw not in old_names:
                report["new_identifiers"].append({"kwarg": kw, "where": wheres[:3]})
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the older torch package directory (…/torch)")
    ap.add_argument("--new", required=True, type=Path, help="the newer torch package directory (…/torch)")
    ap.add_argument("paths", nargs="+", type=Path, help="our files or folders to scan")
    ns = ap.parse_args(argv)
    for p in (ns.old, ns.new):
        if not (p / "__init__.py").is_file():
            print(f"torch tree {p}: no __init__.py there; pass the directory that holds torch/__init__.py", file=sys.stderr)
            return 2
    cols = scan(ns.paths, Path.cwd())
    print(json.dumps(audit(Tree(ns.old), Tree(ns.new), cols), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
