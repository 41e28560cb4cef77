"""Size and import-graph metrics of the package, from the source alone (`ast`; nothing is imported).

    python bench/import_graph.py [FOLDER ...] [--json OUT.json]

Default folders: those of pyproject's `[tool.setuptools.package-dir]` in the repository this
script sits in (today `stream_readapt/`, and the top-level `kernels/` installed as
`stream_readapt.kernels`; the table also names the modules of each folder); without that
table, `stream_readapt/` plus a top-level `kernels/` if there is one. Symlinks are not followed
(a checkout may link `stream_readapt/kernels -> ../kernels`); a module name met twice is
counted once.

Prints: the number of modules and their total lines, the longest functions (methods and
nested functions included, qualified as `Class.method` / `outer.inner`; lines from `def` to
the last line of the body, decorators excluded), and the cycles of the package-internal
import graph: every strongly connected component of more than one module, first with every
import statement counted (module level and inside functions), then with module-level
imports only (those executed at import time: not inside a function, not under
`if TYPE_CHECKING:`).

Edges: `import a.b` and `from a.b import c` give an edge to `a.b`, or to `a.b.c` when that is
a module; relative imports are resolved against the importing module's package. Parent
packages (whose `__init__` runs first) are not edges in the main figures; a last line gives
the cycle counts with those implicit edges added (but not to packages containing the importer,
which are initialised, or initialising, before it runs). `importlib.import_module` / `__import__`
calls are listed as dynamic imports when their target is not a constant.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = 10


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int = 0
    tree: ast.Module | None = None


@dataclass
class Edge:
    src: str
    dst: str
    line: int
    module_level: bool
    implicit: bool = False
    kind: str = "M"  # M: module level, F: inside a function, T: under `if TYPE_CHECKING:`


@dataclass
class Graph:
    modules: dict[str, Module] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- modules

def package_dir_map(repo: Path) -> dict[Path, str]:
    """{folder: package name} from pyproject's [tool.setuptools.package-dir], where present."""
    pyproject = repo / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return {}
    try:
        data = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    mapping = data.get("tool", {}).get("setuptools", {}).get("package-dir", {}) or {}
    return {(repo / folder).resolve(): pkg for pkg, folder in mapping.items() if pkg}


def default_folders(repo: Path) -> list[Path]:
    """pyproject's package-dir folders that exist (a folder inside another one is walked with
    it); without that table, stream_readapt/ plus a top-level kernels/."""
    mapped = sorted({f for f in package_dir_map(repo) if f.is_dir()})
    folders = [f for f in mapped if not any(o != f and o in f.parents for o in mapped)]
    if folders:
        return folders
    folders = [repo / "stream_readapt"]
    if (repo / "kernels").is_dir() and not (repo / "kernels").is_symlink():
        folders.append(repo / "kernels")
    return folders


def collect_modules(folders: list[Path], repo: Path) -> tuple[dict[str, Module], list[str]]:
    names = package_dir_map(repo)
    modules: dict[str, Module] = {}
    notes = []
    for folder in folders:
        folder = folder.resolve()
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not a folder")
        pkg = names.get(folder, folder.name)
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            d = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not (d / n).is_symlink())
            rel = d.relative_to(folder).parts
            for fname in sorted(filenames):
                p = d / fname
                if not fname.endswith(".py") or p.is_symlink():
                    continue
                stem = fname[:-3]
                parts = [pkg, *rel] if stem == "__init__" else [pkg, *rel, stem]
                name = ".".join(parts)
                if name in modules:
                    notes.append(f"{name}: {p} ignored (already read from {modules[name].path})")
                    continue
                text = p.read_text(encoding="utf-8")
                modules[name] = Module(name, p, stem == "__init__", text.count("\n") + (not text.endswith("\n") and bool(text)),
                                       ast.parse(text, filename=str(p)))
    return modules, notes


# ----------------------------------------------------------------------------- functions

def functions(mod: Module):
    """(qualified name, lines, first line) of every function and method in `mod`."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = f"{prefix}{child.name}"
                out.append((q, child.end_lineno - child.lineno + 1, child.lineno))
                visit(child, q + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(mod.tree, "")
    return out


# ----------------------------------------------------------------------------- imports

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_sites(tree: ast.Module):
    """(node, kind) for every import statement: M runs at import time (module level, class
    bodies), F inside a function, T under `if TYPE_CHECKING:` (never at run time)."""
    sites = []

    def visit(node, kind):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                sites.append((child, kind))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "T" if kind == "T" else "F")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(child.test, kind)
                for n in child.body:
                    visit(ast.Module(body=[n], type_ignores=[]), "T")
                for n in child.orelse:
                    visit(ast.Module(body=[n], type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(tree, "M")
    return sites


def _package_of(mod: Module) -> str:
    return mod.name if mod.is_package else mod.name.rpartition(".")[0]


def resolve(mod: Module, node, known: set[str]) -> list[str]:
    """Package-internal modules an import statement loads (named ones, not their parents)."""
    targets = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in known:  # `import a.b.c` where a.b.c is not ours: its deepest ours
                name = name.rpartition(".")[0]
            if name:
                targets.append(name)
        return targets
    if node.level:
        base = _package_of(mod).split(".")
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        base_name = ".".join(base + ([node.module] if node.module else []))
    else:
        base_name = node.module or ""
    if base_name not in known and not any(base_name.startswith(k + ".") for k in known) \
            and not any(k.startswith(base_name + ".") for k in known):
        return []
    subs = [f"{base_name}.{a.name}" for a in node.names if f"{base_name}.{a.name}" in known]
    others = [a for a in node.names if f"{base_name}.{a.name}" not in known]
    targets.extend(subs)
    if others or not subs:
        name = base_name
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.append(name)
    return targets


def dynamic_imports(mod: Module) -> list[str]:
    out = []
    for node in ast.walk(mod.tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if fname in ("import_module", "__import__"):
            arg = ast.unparse(node.args[0]) if node.args else "?"
            out.append(f"{mod.name}:{node.lineno} {fname}({arg}{', ...' if len(node.args) > 1 else ''})")
    return out


def build_graph(modules: dict[str, Module]) -> Graph:
    g = Graph(modules)
    known = set(modules)
    for mod in modules.values():
        for node, kind in import_sites(mod.tree):
            for dst in resolve(mod, node, known):
                if dst != mod.name:
                    g.edges.append(Edge(mod.name, dst, node.lineno, kind == "M", kind=kind))
        g.dynamic.extend(dynamic_imports(mod))
    return g


def parent_edges(g: Graph) -> list[Edge]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those as implicit edges, except
    packages that contain the importer (already initialised, or initialising, before it runs)."""
    out = []
    for e in g.edges:
        parts = e.dst.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in g.modules and parent != e.src and not e.src.startswith(parent + "."):
                out.append(Edge(e.src, parent, e.line, e.module_level, implicit=True, kind=e.kind))
    return out


def sccs(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative), sorted."""
    adj: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        if e.dst not in adj[e.src]:
            adj[e.src].append(e.dst)
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(adj[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(adj[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
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
                    out.append(sorted(comp))
    return sorted(out, key=lambda c: (-len(c), c))


# ----------------------------------------------------------------------------- report

def short(name: str, root: str) -> str:
    return name[len(root) + 1:] if name.startswith(root + ".") else name


def report(folders: list[Path], repo: Path, top: int = TOP) -> tuple[str, dict]:
    modules, notes = collect_modules(folders, repo)
    g = build_graph(modules)
    root = os.path.commonprefix([m.split(".")[0] for m in modules]) or ""
    funcs = sorted(((lines, q, m.name, first) for m in modules.values() for q, lines, first in functions(m)),
                   key=lambda t: (-t[0], t[2], t[1]))
    nodes = sorted(modules)
    all_sccs = sccs(nodes, g.edges)
    mod_edges = [e for e in g.edges if e.module_level]
    mod_sccs = sccs(nodes, mod_edges)
    implicit = parent_edges(g)
    imp_all = sccs(nodes, g.edges + implicit)
    imp_mod = sccs(nodes, mod_edges + [e for e in implicit if e.module_level])
    total_lines = sum(m.lines for m in modules.values())
    n_funcs = len(funcs)

    L = []
    L.append(f"folders: {', '.join(str(f) for f in folders)}")
    for n in notes:
        L.append(f"note: {n}")
    L.append(f"modules: {len(modules)}  (packages: {sum(m.is_package for m in modules.values())})")
    L.append(f"total lines: {total_lines}")
    L.append(f"functions (incl. methods, nested): {n_funcs}")
    if funcs:
        lines, q, m, first = funcs[0]
        L.append(f"longest function: {q} in {m} ({lines} lines, from line {first})")
    L.append(f"{top} longest functions:")
    for lines, q, m, first in funcs[:top]:
        L.append(f"  {lines:5d}  {m}:{first}  {q}")
    L.append("largest modules:")
    for m in sorted(modules.values(), key=lambda m: (-m.lines, m.name))[:top]:
        L.append(f"  {m.lines:5d}  {m.name}")
    n_mod_edges = len({(e.src, e.dst) for e in mod_edges})
    n_all_edges = len({(e.src, e.dst) for e in g.edges})
    L.append(f"internal import edges (distinct module pairs): {n_all_edges} all, {n_mod_edges} module-level only")

    def cycles(title, comps, edges):
        L.append(f"{title}: {len(comps)} SCC(s) of size > 1"
                 + (f", {sum(len(c) for c in comps)} modules in them" if comps else ""))
        for i, comp in enumerate(comps, 1):
            members = set(comp)
            L.append(f"  [{i}] {len(comp)} modules: {', '.join(short(c, root) for c in comp)}")
            seen = {}
            for e in edges:
                if e.src in members and e.dst in members:
                    seen.setdefault((e.src, e.dst), []).append(f"{e.kind}{e.line}"
                                                               + ("*" if e.implicit else ""))
            for (s, d), where in sorted(seen.items()):
                L.append(f"      {short(s, root)} -> {short(d, root)}  ({', '.join(where)})")

    cycles("cycles, all imports (module-level and in functions)", all_sccs, g.edges)
    cycles("cycles, module-level imports only", mod_sccs, mod_edges)
    L.append("  (M = module-level import at that line, F = import inside a function, T = under TYPE_CHECKING)")
    L.append(f"with implicit parent-package edges (a/__init__ runs before a.b): {len(imp_all)} SCC(s) all imports "
             f"({sum(len(c) for c in imp_all)} modules), {len(imp_mod)} module-level only "
             f"({sum(len(c) for c in imp_mod)} modules)")
    if g.dynamic:
        L.append("dynamic imports (not in the graph):")
        L.extend(f"  {d}" for d in g.dynamic)
    data = {
        "modules": len(modules), "total_lines": total_lines, "functions": n_funcs,
        "longest_functions": [{"name": q, "module": m, "lines": lines, "line": first} for lines, q, m, first in funcs[:top]],
        "module_lines": {m.name: m.lines for m in modules.values()},
        "edges_all": n_all_edges, "edges_module_level": n_mod_edges,
        "sccs_all": all_sccs, "sccs_module_level": mod_sccs,
        "sccs_all_with_parents": imp_all, "sccs_module_level_with_parents": imp_mod,
        "dynamic_imports": g.dynamic,
    }
    return "\n".join(L), data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", type=Path,
                    help="package folders (default: stream_readapt/ and kernels/ of this script's repository)")
    ap.add_argument("--repo", type=Path, default=REPO, help="repository root, for pyproject's package-dir (default: %(default)s)")
    ap.add_argument("--top", type=int, default=TOP)
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    folders = args.folders or default_folders(repo)
    text, data = report(folders, repo, args.top)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
