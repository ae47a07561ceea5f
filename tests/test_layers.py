"""The import graph of src/ponder: five layers (base, engine, methods, trainers, recipes), imports only downward,
no cycles (imports inside functions count), no module reaching into another module's private names,
function-local imports only in the CLI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "ponder"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


MODULES = _modules()
LEAVES = {m.rsplit(".", 1)[-1] for m in MODULES}  # `rollout._x` reaches into a module whatever its folder


def layer(mod: str) -> int:
    """0 base (config, ui: no ponder imports), 1 engine, 2 methods, 3 trainers, 4 recipes (and the CLI on top)."""
    if mod.startswith("ponder.recipes") or mod in ("ponder.cli", "ponder.__main__"):
        return 4
    for n, prefix in ((3, "ponder.trainers"), (2, "ponder.methods"), (1, "ponder.engine")):
        if mod.startswith(prefix):
            return n
    return 0


def _imports(path: Path):
    """(imported ponder module, names, line, inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        local = id(node) in funcs
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ponder"):
                    yield a.name, [], node.lineno, local
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ponder") and not node.level:
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if subs:
                for s in subs:
                    yield s, [], node.lineno, local
            else:
                yield node.module, names, node.lineno, local


def graph() -> dict[str, set[str]]:
    return {m: {d for d, *_ in _imports(p) if d in MODULES and d not in (m, "ponder")} for m, p in MODULES.items()}


def test_no_import_climbs_a_layer():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)}) at {MODULES[m].name}:{line}"
           for m, p in MODULES.items() for d, _, line, _ in _imports(p) if d in MODULES and layer(d) > layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    cycles = []
    for start in g:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in g[node]:
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_no_private_names_across_modules():
    bad = [f"{m} imports {n} from {d} ({MODULES[m].name}:{line})" for m, p in MODULES.items()
           for d, names, line, _ in _imports(p) for n in names if n.startswith("_") and d != m]
    bad += [f"{m} uses {node.value.id}.{node.attr}" for m, p in MODULES.items()
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.attr.startswith("_") and not node.attr.startswith("__")
            and node.value.id in LEAVES]
    assert not bad, "\n".join(bad)


def test_function_local_ponder_imports_only_in_the_cli():
    bad = [f"{m} imports {d} inside a function ({MODULES[m].name}:{line})" for m, p in MODULES.items()
           if m not in ("ponder.cli", "ponder") for d, _, line, local in _imports(p) if local]
    assert not bad, "\n".join(bad)


def test_the_layer_rule_is_checked():
    """The checks above see real imports: recipes import trainers, trainers import the methods' math."""
    g = graph()
    assert "ponder.trainers.latro" in g["ponder.recipes.latro"]
    assert "ponder.methods.latro" in g["ponder.trainers.latro"]
    assert layer("ponder.recipes.demo") == 4 and layer("ponder.trainers.sft") == 3 and layer("ponder.config") == 0
    assert layer("ponder.methods.rise") == 2 and layer("ponder.engine.tree") == 1


def test_every_component_sits_in_its_layer_folder():
    """The file list shows the architecture: only the base modules (no ponder imports) and the CLI sit at the top
    of src/ponder; the rest is in engine/, methods/, trainers/, recipes/."""
    top = sorted(m for m in MODULES if m.count(".") == 1 and not any(
        m == f"ponder.{d}" for d in ("engine", "methods", "trainers", "recipes")))
    assert top == ["ponder.__main__", "ponder.cli", "ponder.config", "ponder.ui"]
    assert all(not graph()[m] for m in ("ponder.config", "ponder.ui"))
