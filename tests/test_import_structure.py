"""Import structure of ``src/kdforge``, read from the code: no import cycles between modules, the
trainer never imports the evaluation package, and no module imports vLLM when it is imported.

The graph has an edge ``a -> b`` for every ``import`` / ``from ... import`` of ``b`` anywhere in
``a`` (module level, inside functions, under ``TYPE_CHECKING``): a lazy import hides a cycle
from the interpreter, not from the design. Package ``__init__`` modules are not nodes of the
cycle check (a package re-exporting its modules is not a loop of work).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@cache
def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the kdforge package."""
    out = {}
    for f in (SRC / "kdforge").rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _imports(source: str, name: str, is_package: bool, known: set[str] | dict[str, Path]) -> frozenset[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in ``source``
    (``from pkg import sub`` counts as importing ``pkg.sub``; relative imports resolved)."""
    pkg = name if is_package else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names}
    return frozenset(t for t in targets if t in known and t != name)


@cache
def _graph() -> dict[str, frozenset[str]]:
    """``{module: kdforge modules it imports}``."""
    mods = _modules()
    return {name: _imports(f.read_text(), name, f.name == "__init__.py", mods) for name, f in mods.items()}


def _cycles(graph: dict[str, frozenset[str]], skip: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index or root in skip:
            continue
        work = [(root, iter(sorted(graph[root] - skip)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w] - skip))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_reports_a_loop_and_ignores_a_chain():
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}),
             "d": frozenset({"a"}), "p": frozenset({"d", "a"}), "a2": frozenset({"p"})}
    assert _cycles(graph, skip={"p"}) == [["a", "b", "c"]]
    assert _cycles({"x": frozenset({"y"}), "y": frozenset()}, skip=set()) == []


def test_imports_count_lazy_type_only_and_relative_ones():
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        from . import sibling
        from ..other import thing
        if TYPE_CHECKING:
            from pkg.typed import T
        def f():
            import pkg.lazy
    """)
    known = {"pkg.sub.sibling", "pkg.other", "pkg.typed", "pkg.lazy", "pkg.sub.me"}
    assert _imports(source, "pkg.sub.me", False, known) == known - {"pkg.sub.me"}


def test_no_import_cycle_between_kdforge_modules():
    packages = {n for n, f in _modules().items() if f.name == "__init__.py"}
    cycles = _cycles(_graph(), skip=packages)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _train_to_eval() -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in _graph().items() if a == "kdforge.train" or a.startswith("kdforge.train.")
                  for b in targets if b == "kdforge.eval" or b.startswith("kdforge.eval."))


def test_train_imports_nothing_from_eval():
    edges = _train_to_eval()
    assert not edges, "kdforge.train* imports kdforge.eval*: " + ", ".join(f"{a} -> {b}" for a, b in edges)


def test_no_kdforge_module_imports_vllm_at_import_time(tmp_path):
    """Every module imports with ``vllm`` unimportable, and none of them loads it."""
    names = sorted(n for n in _modules() if not n.rsplit(".", 1)[-1].startswith("__"))
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["vllm"] = None  # `import vllm` raises ImportError, as when it is not installed
        failed = []
        for name in {names!r}:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failed.append(f"{{name}}: {{exc}}")
        loaded = [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        assert not failed, failed
        assert sys.modules["vllm"] is None and loaded == ["vllm"], loaded
        print("ok", len({names!r}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
