"""The house: arrows point down only (scripts -> train -> {hf, data, peft checkpoints} -> checkpoint_io -> model and
config -> torch), no import cycles, no function-local imports of our own modules, and `import lit_model` needs torch
only. Parsed from the sources, so a new module that breaks the rule fails here, not in a user's traceback."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lit_model"

# Layers, lowest first: a module may import modules of lower layers only (and of its own layer inside its own
# package, as long as that makes no cycle).
LAYERS: list[tuple[str, ...]] = [
    ("lit_model.config", "lit_model.errors"),
    ("lit_model.model", "lit_model.integrity", "lit_model.precision", "lit_model.quantize", "lit_model.cli",
     "lit_model.chat_template", "lit_model.tokenizer", "lit_model.peft.base"),
    ("lit_model.loss", "lit_model.memory", "lit_model.checkpointing", "lit_model.sampling", "lit_model.prompts",
     "lit_model.badam", "lit_model.dropbp", "lit_model.peft.lora", "lit_model.peft"),
    ("lit_model.checkpoint_io",),
    ("lit_model.peft.checkpoint", "lit_model.data"),
    ("lit_model.hf",),
    ("lit_model.train",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of a module: the layer of the longest listed prefix (a package's modules share its layer)."""
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), i
    assert found is not None, f"{module} is in no layer of tests/test_architecture.py: give it one"
    return found


def imports() -> dict[str, list[tuple[str, bool, int]]]:
    """For every module of lit_model: (imported lit_model module, inside a function?, line)."""
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module and (
                        child.module == "lit_model" or child.module.startswith("lit_model.")):
                    # `from lit_model.pkg import x`: x is a submodule, or a name of the package's __init__
                    folder = ROOT.joinpath(*child.module.split("."))
                    for alias in child.names:
                        submodule = (folder / alias.name).is_dir() or (folder / f"{alias.name}.py").is_file()
                        found.append((f"{child.module}.{alias.name}" if submodule else child.module, local,
                                      child.lineno))
                elif isinstance(child, ast.Import):
                    found.extend((a.name, local, child.lineno) for a in child.names if a.name.startswith("lit_model."))
                visit(child, inner)

        visit(tree, False)
        out[module_name(path)] = found
    return out


def test_arrows_point_down() -> None:
    upward = []
    for module, targets in imports().items():
        if module == "lit_model":  # the package re-exports config and model
            continue
        for target, _, line in targets:
            same_package = target.split(".")[:2] == module.split(".")[:2]  # e.g. lit_model.train.* among themselves
            if layer_of(target) > layer_of(module) or (layer_of(target) == layer_of(module) and not same_package):
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _, _ in ts if t in imports_of_modules()} for m, ts in imports().items()}
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in seen:
                walk(nxt, stack + [nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def imports_of_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def test_no_function_local_imports_of_our_modules() -> None:
    """Function-local imports are for heavy optional dependencies (bitsandbytes, gguf, jinja2, transformers); our
    own modules are imported at the top, where the layers above can see them."""
    local = [f"{m}:{line} imports {t}" for m, ts in imports().items() for t, is_local, line in ts if is_local]
    assert not local, "function-local imports of lit_model modules:\n" + "\n".join(local)


def test_import_lit_model_needs_torch_only() -> None:
    code = ("import sys, lit_model; heavy = {'lightning', 'yaml', 'jsonargparse', 'transformers', 'tokenizers', "
            "'sentencepiece', 'bitsandbytes', 'safetensors', 'jinja2', 'gguf', 'matplotlib'}; "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_module_is_in_a_layer() -> None:
    for module in imports_of_modules():
        if module != "lit_model":
            layer_of(module)
