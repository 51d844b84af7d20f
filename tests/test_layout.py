"""The package's shape: a subpackage per concept, and imports that only go one way.

Every `import` and `from ... import` inside minilora/ counts, at module level or inside
a function: a lazy import may keep start-up cheap (the CLI's commands), but it must not
hide a cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minilora"
SUBPACKAGES = ("lora", "qlora", "models", "io", "train", "fast", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The minilora modules `name` imports (a package's import of a submodule counted too)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import sub` depends on the submodule; `from pkg import name` on pkg itself.
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        else:
            continue
        for t in targets:
            if t.startswith("minilora.kernels"):  # kernels/ at the repo root, installed as minilora.kernels
                continue
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_architecture_shows_as_subpackages():
    for sub in SUBPACKAGES:
        assert (PKG / sub / "__init__.py").is_file(), sub
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"], f"modules left at the top of minilora/: {flat}"


def test_no_import_cycles_anywhere():
    graph = import_graph()
    # A subpackage's __init__ importing its own modules is how a package re-exports;
    # it is not a cycle unless a module imports back through the package.
    found = cycles(graph)
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


TEACHING = ("minilora.lora", "minilora.qlora", "minilora.models", "minilora.io")


def test_teaching_code_imports_neither_the_fast_path_nor_the_trainer():
    graph = import_graph()
    offenders = sorted(f"{mod} -> {dep}" for mod, deps in graph.items() if mod.startswith(TEACHING)
                       for dep in deps if dep.startswith(("minilora.fast", "minilora.train")))
    assert not offenders, offenders


def test_the_public_api_does_not_import_the_fast_path():
    assert not any(dep.startswith("minilora.fast") for dep in import_graph()["minilora"])


def test_the_layer_a_reader_came_for_fits_in_250_lines():
    import minilora

    path = Path(minilora.LoRALinear.__module__.replace(".", "/") + ".py")
    assert path == Path("minilora/lora/layer.py")
    assert len((ROOT / path).read_text().splitlines()) <= 250
