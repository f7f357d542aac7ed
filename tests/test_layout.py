"""The package's import graph has no cycle: every import in fastalign/ (module level or inside a function) points
down the layers ops -> rl/losses -> hf -> train -> cli."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastalign"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            # an import names a module (or a name in one): the edge goes to that module itself
            edges |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
        graph[name] = edges - {"fastalign"}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert "fastalign.hf" in graph and "fastalign.train.ppo" in graph["fastalign.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_hugging_face_knowledge_lives_in_one_module():
    holders = {module_name(p) for p in PACKAGE.rglob("*.py")
               if any(k in p.read_text() for k in ("final_logit_softcapping", "get_output_embeddings", "get_decoder"))}
    assert holders == {"fastalign.hf"}


def test_test_files_have_unique_names():
    """tests/ has no __init__.py files: pytest imports each test module by its basename, so two alike collide."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
