"""Layering: the trust zones of ``lora_kernel`` import only what their zone may see.

Every ``.py`` under ``lora_kernel/`` is parsed with :mod:`ast` and every import is collected —
module level, inside functions and classes, under ``if``/``try`` (``TYPE_CHECKING`` included:
it still ties the zones together), relative imports resolved, and ``importlib.import_module`` /
``__import__`` with a literal name. The rules (DESIGN.md, "Layout"):

- ``kernel/``, ``training/``, ``steps/`` and ``user/`` (untrusted: they run as the user) never
  import ``lora_kernel.trusted`` or ``lora_kernel.cli``;
- ``trusted/`` never imports those user-side folders: what both sides share (file and variable
  names, the kernel name, the run description and pin answer) lives in ``common/``;
- ``provenance/`` imports no ``lora_kernel.*`` but ``lora_kernel.common`` and itself;
- ``common/`` imports no ``lora_kernel.*`` but itself;
- ``common/``, ``provenance/`` and ``trusted/`` never import torch, diffusers, transformers,
  peft or safetensors.torch directly;
- ``hub/`` (trusted, JupyterHub side) never imports kernel internals (``lora_kernel.kernel``,
  ``lora_kernel.training``) nor the heavy libraries, nor the user-side ``lora_kernel.steps`` and
  ``lora_kernel.user``, and nothing in ``lora_kernel`` imports
  ``hub`` (the kernel, the CLI and the runner reach the hub only over HTTP);

no two modules import each other, directly or round a loop (:func:`import_cycles`); every
module's docstring says which account runs it (``Runs as``);

and, at run time, importing every module of ``lora_kernel.trusted`` and
``lora_kernel.provenance`` leaves ``torch`` out of ``sys.modules``.

``from X import a`` counts as importing ``X`` and ``X.a`` (``a`` may be a submodule); a bare
``import lora_kernel`` (the top package, run by any submodule import anyway) is allowed
everywhere.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lora_kernel"
HUB = REPO / "hub"
HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors.torch")
# The folders whose code runs as the user (untrusted).
USER_SIDE = ("kernel", "training", "steps", "user")


@dataclass(frozen=True)
class Import:
    """One import statement: where it is, what it names (``targets``) and its source text."""

    line: int
    targets: tuple[str, ...]
    text: str


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return module or ""
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"relative import beyond the top package in {current}")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def collect_imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the text of module ``module``), at any depth."""
    found: list[Import] = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, module, is_package)
            targets = (base,) + tuple(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name)
                    and node.func.id in ("__import__", "import_module"))
                   or (isinstance(node.func, ast.Attribute)
                       and node.func.attr == "import_module"))):
            targets = (node.args[0].value,)
        else:
            continue
        text = " ".join(lines[node.lineno - 1:node.end_lineno or node.lineno]).split()
        found.append(Import(node.lineno, targets, " ".join(text)))
    return sorted(found, key=lambda i: i.line)


def _rule(zone: str, target: str) -> str | None:
    """The rule ``target`` breaks when imported from ``zone`` (None: allowed)."""
    internal = _within(target, "lora_kernel") and target != "lora_kernel"
    if zone == "hub" and (_within(target, "lora_kernel.kernel")
                          or _within(target, "lora_kernel.training")
                          or any(_within(target, h) for h in HEAVY)):
        return "hub/ must not import kernel internals (lora_kernel.kernel/.training) or " + \
            ", ".join(HEAVY)
    if zone == "hub" and (_within(target, "lora_kernel.steps")
                          or _within(target, "lora_kernel.user")):
        return "hub/ must not import the user-side lora_kernel.steps or lora_kernel.user"
    if zone != "hub" and _within(target, "hub"):
        return "lora_kernel must not import hub/ (it reaches the hub over HTTP)"
    if zone in USER_SIDE and internal and (
            _within(target, "lora_kernel.trusted") or _within(target, "lora_kernel.cli")):
        return f"{zone}/ (untrusted) must not import lora_kernel.trusted or lora_kernel.cli"
    if zone == "trusted" and any(_within(target, f"lora_kernel.{side}") for side in USER_SIDE):
        return ("trusted/ must not import the user-side folders (" + ", ".join(USER_SIDE)
                + "); what both sides share lives in common/")
    if zone == "provenance" and internal and not (
            _within(target, "lora_kernel.common") or _within(target, "lora_kernel.provenance")):
        return "provenance/ may import only lora_kernel.common and lora_kernel.provenance"
    if zone == "common" and internal and not _within(target, "lora_kernel.common"):
        return "common/ may import only lora_kernel.common"
    if zone in ("common", "provenance", "trusted") and any(_within(target, h) for h in HEAVY):
        return f"{zone}/ must not import {', '.join(HEAVY)}"
    return None


def violations(module: str, imports: list[Import]) -> list[tuple[Import, str]]:
    """The imports of ``module`` that break a layering rule, each with the rule broken."""
    parts = module.split(".")
    zone = "hub" if parts[0] == "hub" else (parts[1] if len(parts) > 1 else "")
    bad: list[tuple[Import, str]] = []
    for imp in imports:
        rules = [r for r in (_rule(zone, t) for t in imp.targets) if r]
        if rules:
            bad.append((imp, rules[0]))  # one report per statement
    return bad


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _tree() -> dict[Path, tuple[str, list[Import]]]:
    tree = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *HUB.glob("**/*.py")]):
        if "node_modules" in path.parts:
            continue
        module, is_package = _module_name(path)
        tree[path] = (module, collect_imports(path.read_text(), module, is_package))
    return tree


# --- the walker itself: catches a function-level violation, accepts legal imports ----------

def test_walker_catches_function_level_import_and_accepts_legal_ones():
    source = textwrap.dedent("""
        from __future__ import annotations
        import os
        from lora_kernel.common.digests import sha256_file
        from ..common import paths
        from . import records

        def verify(x):
            import hashlib
            from lora_kernel.trusted.ledger import Ledger   # line 10: refused
            return Ledger

        class Lazy:
            def load(self):
                from ..trusted import sealing                 # line 15: refused (relative)
                return importlib.import_module("torch")        # line 16: refused (string)
    """)
    imports = collect_imports(source, "lora_kernel.provenance.audit")
    assert {t for i in imports for t in i.targets} >= {
        "os", "hashlib", "lora_kernel.common.digests", "lora_kernel.common.paths",
        "lora_kernel.provenance.records", "lora_kernel.trusted.ledger",
        "lora_kernel.trusted.sealing", "torch"}
    bad = violations("lora_kernel.provenance.audit", imports)
    assert [(imp.line, rule.split()[0]) for imp, rule in bad] == [
        (10, "provenance/"), (15, "provenance/"), (16, "provenance/")]
    assert "from lora_kernel.trusted.ledger import Ledger" in bad[0][0].text

    # must work: the same legal imports in a trusted module, and function-level trusted
    # imports in the cli are fine; kernel/ may import common and kernel.
    legal = collect_imports(textwrap.dedent("""
        import os
        from lora_kernel.common.digests import sha256_file
        from lora_kernel.provenance.ledger import open_ledger
        def f():
            from lora_kernel.trusted.ledger import Ledger
    """), "lora_kernel.trusted.review")
    assert violations("lora_kernel.trusted.review", legal) == []
    kernel = collect_imports("def f():\n    from ..common import paths\n    import torch\n",
                             "lora_kernel.kernel.guard")
    assert violations("lora_kernel.kernel.guard", kernel) == []
    assert violations("lora_kernel.training.loop", collect_imports(
        "def f():\n    from lora_kernel.cli import main\n", "lora_kernel.training.loop"))
    assert violations("lora_kernel.common.paths", collect_imports(
        "from safetensors.torch import save_file\n", "lora_kernel.common.paths"))
    assert violations("lora_kernel.common.paths", collect_imports(
        "import lora_kernel\nfrom . import errors\n", "lora_kernel.common.paths",
    )) == []


def test_walker_resolves_relative_imports_in_packages():
    assert _resolve(None, 1, "lora_kernel.common", True) == "lora_kernel.common"
    assert _resolve("x", 2, "lora_kernel.common", True) == "lora_kernel.x"
    assert _resolve("errors", 1, "lora_kernel.common.paths", False) == "lora_kernel.common.errors"
    with pytest.raises(ValueError):
        _resolve("x", 3, "lora_kernel.common", False)


# --- the real tree ----------------------------------------------------------------------

def test_walker_sees_the_real_tree():
    tree = _tree()
    assert len(tree) > 40
    # a known function-level import in the real code is seen (evidence the walk goes deep)
    _, executor = tree[PACKAGE / "steps" / "executor.py"]
    assert any("lora_kernel.training.checks" in i.targets for i in executor)
    _, spawner = tree[HUB / "spawner.py"]                      # hub/ is walked too
    assert any("jupyterhub.spawner" in i.targets for i in spawner)


def test_hub_rules_refuse_kernel_internals_and_allow_trusted_code():
    bad = collect_imports("from lora_kernel.kernel.offline import offline_environ\n",
                          "hub.spawner")
    assert violations("hub.spawner", bad)
    assert violations("lora_kernel.cli.run", collect_imports("import hub.gpus\n",
                                                             "lora_kernel.cli.run"))
    good = collect_imports("from lora_kernel.trusted.identity import Actor\n"
                           "from lora_kernel.provenance import audit\nfrom .gpus import Pool\n",
                           "hub.spawner")
    assert violations("hub.spawner", good) == []


def test_zones_import_only_what_they_may():
    problems = [f"{path.relative_to(REPO)}:{imp.line}: {imp.text!r} — {rule}"
                for path, (module, imports) in _tree().items()
                for imp, rule in violations(module, imports)]
    assert not problems, "layering violations:\n" + "\n".join(problems)


_IMPORT_ALL = """
import importlib, json, pkgutil, sys
heavy = ("torch", "diffusers", "transformers", "peft")
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in heavy)
first, errors = {}, {}
for name in ("lora_kernel.trusted", "lora_kernel.provenance"):
    pkg = importlib.import_module(name)
    mods = [name] + [m.name for m in pkgutil.walk_packages(
        pkg.__path__, name + ".", onerror=lambda n: errors.setdefault(n, "walk failed"))]
    for mod in mods:
        before = set(loaded())
        try:
            importlib.import_module(mod)
        except Exception as exc:
            errors[mod] = f"{type(exc).__name__}: {exc}"
        for heavy_mod in set(loaded()) - before:
            first.setdefault(heavy_mod.split(".")[0], mod)
print(json.dumps({"imported": sorted(m for m in sys.modules if m.startswith("lora_kernel")),
                  "heavy": sorted({m.split(".")[0] for m in loaded()}),
                  "pulled_in_by": first, "errors": errors}))
"""


def test_trusted_and_provenance_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], result["errors"]
    assert "lora_kernel.trusted.review" in result["imported"]  # must work: the walk ran
    assert "lora_kernel.provenance.audit" in result["imported"]
    assert "torch" not in result["pulled_in_by"], (
        f"torch imported by {result['pulled_in_by']['torch']}; "
        f"heavy modules loaded: {result['heavy']}")
    assert not result["heavy"], f"heavy modules loaded: {result['pulled_in_by']}"


# --- no import circles --------------------------------------------------------------------

def import_graph(tree: dict[Path, tuple[str, list[Import]]]) -> dict[str, set[str]]:
    """Module → the modules of the walked tree it imports.

    Every import the walker collects is an edge — module level, inside functions and classes,
    under ``if TYPE_CHECKING``: a function-level import is a real dependency (it runs whenever
    the function does; moving an import into a function to dodge a circle hides the circle,
    it does not remove it), and a ``TYPE_CHECKING`` import still ties the two modules' meaning
    together. A target names the longest module of the tree it starts with (``from X import a``
    is ``X.a`` when that is a module, else ``X``). Importing one's own package (an ancestor,
    run anyway before any submodule) and imports outside the tree are no edges.
    """
    modules = {module for module, _ in tree.values()}

    def owner(target: str) -> str | None:
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            name = ".".join(parts[:end])
            if name in modules:
                return name
        return None

    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, imports in tree.values():
        for imp in imports:
            for target in imp.targets:
                found = owner(target)
                if found and found != module and not _within(module, found):
                    graph[module].add(found)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph``: each strongly connected component of more than one module
    (Tarjan's algorithm, iterative), sorted, as one list of sorted module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_cycle_finder_finds_direct_and_round_a_loop_circles():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "f"}, "f": set()}
    assert import_cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    # must work: a tree without a circle, and an import of one's own package
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    tree = {Path("p/m.py"): ("p.m", collect_imports("from p import n\n", "p.m")),
            Path("p/n.py"): ("p.n", collect_imports("def f():\n    import p.m\n", "p.n")),
            Path("p/__init__.py"): ("p", collect_imports("from . import m\n", "p", True))}
    graph = import_graph(tree)
    assert graph["p.m"] == {"p.n"} and graph["p.n"] == {"p.m"}  # function level counts
    assert graph["p"] == {"p.m"}                                  # a package imports its own
    assert import_cycles(graph) == [["p.m", "p.n"]]


def test_no_import_circles():
    cycles = import_cycles(import_graph(_tree()))
    assert not cycles, "modules that import each other (directly or round a loop):\n" + \
        "\n".join(" ↔ ".join(cycle) for cycle in cycles)


def test_user_side_and_trusted_stay_apart():
    for zone in ("steps", "user"):
        module = f"lora_kernel.{zone}.x"
        assert violations(module, collect_imports(
            "from lora_kernel.trusted.runseal import seal_run\n", module))
        # must work: the shared contract in common/
        assert violations(module, collect_imports(
            "from lora_kernel.common.contract import ACK\n", module)) == []
    for side in USER_SIDE:
        assert violations("lora_kernel.trusted.runner", collect_imports(
            f"def f():\n    from lora_kernel.{side} import x\n", "lora_kernel.trusted.runner"))
    assert violations("lora_kernel.trusted.runner", collect_imports(
        "from lora_kernel.common.contract import KERNEL_NAME\n", "lora_kernel.trusted.runner",
    )) == []
    assert violations("hub.services.k8s_run", collect_imports(
        "from lora_kernel.steps.jobstep import ACK\n", "hub.services.k8s_run"))


def test_every_module_says_which_account_runs_it():
    missing = [str(path.relative_to(REPO)) for path in _tree()
               if "Runs as" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not missing, "module docstrings that do not say which account runs them " \
        "('Runs as ...'):\n" + "\n".join(missing)
