"""Import cycles among twotower's modules: none, counting the imports inside functions (and under
TYPE_CHECKING) too, and the model code imports no layer above it (decoding, checkpoint I/O, training,
invocation): `twotower.api` attaches those methods from above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import twotower

ROOT = Path(twotower.__file__).parent.parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in (ROOT / "twotower").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, modules: dict[str, Path], *, top_level: bool) -> set[str]:
    """The twotower modules `name` imports: module-level statements only, or every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_level_import_cycles():
    modules = module_names()
    graph = {m: imports(m, p, modules, top_level=True) for m, p in modules.items()}
    assert cycles(graph) == []


def test_no_import_cycles_counting_imports_inside_functions():
    modules = module_names()
    graph = {m: imports(m, p, modules, top_level=False) for m, p in modules.items()}
    assert cycles(graph) == []


MODEL_CODE = ("twotower.backbone", "twotower.model", "twotower.context", "twotower.cache", "twotower.config")
ABOVE_THE_MODEL = (
    "twotower.decode",
    "twotower.checkpoint",
    "twotower.keymap",
    "twotower.stream_load",
    "twotower.memory_plan",
    "twotower.device_plan",
    "twotower.train",
    "twotower.api",
    "twotower.cli",
)


@pytest.mark.parametrize("name", MODEL_CODE)
def test_model_code_imports_nothing_above_it(name):
    modules = module_names()
    found = imports(name, modules[name], modules, top_level=False)
    assert not [m for m in found if m.startswith(ABOVE_THE_MODEL)]


def test_the_conveniences_are_attached_from_above():
    from twotower import NemotronHForCausalLM, TwoTowerForCausalLM

    for name in ("from_pretrained", "from_backbone_pretrained", "save_pretrained", "score", "generate_ar"):
        assert callable(getattr(TwoTowerForCausalLM, name))
    for name in ("generate_mock_ar", "generate_mask_diffusion", "generate_speculative"):
        assert callable(getattr(TwoTowerForCausalLM, name))
    for name in ("from_pretrained", "save_pretrained", "generate"):
        assert callable(getattr(NemotronHForCausalLM, name))
