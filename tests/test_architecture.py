"""The package's shape: imports go from higher layers to lower ones only (the CLI uses the benchmarks and
reports, which use the engine, which uses methods and tasks, which use the model and data), no module
imports itself back through others, and no source file is over 400 lines unless its top says why."""

import ast
from pathlib import Path

SOURCE = Path(__file__).parents[1] / "src" / "ubsmoe"
LAYERS = {"storage": 0, "config": 0, "data": 1, "model": 1, "metrics": 2, "tasks": 2, "methods": 2, "engine": 3,
          "report": 4, "bench": 5, "cli": 6, "cli_parser": 6, "cli_commands": 6, "__main__": 7}


def modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(("ubsmoe", *path.relative_to(SOURCE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ubsmoe"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ubsmoe")}
    return found & set(known)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def test_imports_go_down_the_layers_and_never_in_a_circle():
    known = modules()
    graph = {m: imports(p, known) for m, p in known.items()}
    upward = sorted((m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m))
    assert upward == []

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return False

    assert [m for m in graph if reaches(m, m)] == []


def test_no_source_file_is_over_400_lines_without_a_reason_at_its_top():
    long = [p.name for p in SOURCE.rglob("*.py")
            if len(p.read_text().splitlines()) > 400 and "over 400 lines" not in p.read_text()[:2000]]
    assert long == []
