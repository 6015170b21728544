"""The package's layers depend one way: no import cycle, counting imports inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evclip_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (any nesting)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""])
                    base = base.strip(".")
                else:
                    base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            # A package's own __init__ is not a dependency of its submodules' cycle.
            graph[m].update(n for n in names if n in mods and n != m
                            and not m.startswith(n + "."))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_finder_sees_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "evclip_jax.trainer" in graph and "evclip_jax.evaluate.runner" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_point_one_way():
    graph = import_graph()

    def reaches(a, b):
        seen, todo = set(), [a]
        while todo:
            for n in graph[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return b in seen

    assert not reaches("evclip_jax.api", "evclip_jax.trainer")
    assert not reaches("evclip_jax.evaluate.runner", "evclip_jax.trainer")
    assert not reaches("evclip_jax.step", "evclip_jax.trainer")
    assert not reaches("evclip_jax.checkpoints", "evclip_jax.api")


def test_no_module_over_500_lines():
    long = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long
