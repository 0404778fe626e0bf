"""The package's layers, read from its source: no module imports a layer above it, the node
never imports the lab, and `dicom-node serve` loads nothing from the lab.

Every `import dicom_node...` / `from dicom_node... import` counts, also those inside
functions (the CLI and the node import lazily): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dicom_node"

# Low to high. A module may import its own component and any lower one.
RANKS = {
    "": 0, "errors": 0,  # "": dicom_node itself (__version__)
    "log": 1, "files": 1, "metrics": 1,  # metrics: counted in every stage, as they log
    "libraries": 2, "config": 2, "systemd": 2,
    "tls": 3, "store": 3, "queue": 3, "pixels": 3,
    "model": 4,
    "report": 5,
    "receive": 6, "analyse": 6, "deliver": 6,
    "ops": 7,
    "node": 8,
    "bench": 9,  # benchmarks of the node (and of the detector path): leaves
    "cli": 10, "__main__": 11,
}  # fmt: skip
# The lab sits beside the node, on the model library and the pixel pipeline.
LAB_MAY_IMPORT = {"", "errors", "log", "files", "libraries", "config", "pixels", "model", "lab"}


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The dicom_node modules `path` imports, anywhere in it."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "dicom_node")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "dicom_node":
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def existing(imported: str, known: dict) -> str:
    """`imported` as a module of the package (`from x import name` may name a function)."""
    return imported if imported in known else imported.rpartition(".")[0]


def test_no_module_imports_a_layer_above_it():
    known = modules()
    wrong = []
    for module, imported in sorted(known.items()):
        mine = component(module)
        for target in sorted({existing(i, known) for i in imported}):
            theirs = component(target)
            if mine == "lab":
                allowed = theirs in LAB_MAY_IMPORT
            elif theirs == "lab":  # the CLI runs the lab; a benchmark may draw phantoms
                allowed = mine in {"cli", "__main__", "bench"}
            else:
                allowed = theirs == mine or RANKS[theirs] < RANKS[mine]
            if not allowed:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_only_main_imports_the_cli():
    importers = sorted(m for m, imported in modules().items() if "dicom_node.cli" in imported)
    assert importers == ["dicom_node.__main__"]


def test_what_serve_runs_reaches_nothing_of_the_lab():
    """The import closure of the node (lazy imports included) has no lab module in it."""
    known = modules()
    start = ["dicom_node.node", "dicom_node.analyse.worker", "dicom_node.receive", "dicom_node.deliver.runner"]
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module in seen or module not in known:
            continue
        seen.add(module)
        todo.extend(existing(i, known) for i in known[module])
    assert [m for m in seen if component(m) == "lab"] == []
    assert {"dicom_node.model.detector", "dicom_node.pixels"} <= seen  # the closure was followed


@pytest.mark.parametrize("entry", ["dicom_node.node", "dicom_node.analyse.worker"])
def test_importing_the_node_loads_no_lab_module(entry):
    code = (
        f"import sys, {entry}; "
        "print(sorted(m for m in sys.modules if m.startswith('dicom_node.lab')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    """A lab import in a node module is found (the check reads what it claims to)."""
    text = (PACKAGE / "store.py").read_text()
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        text + "\nfrom dicom_node.lab.phantom import write_phantoms\n" if self.name == "store.py"
        and self.parent == PACKAGE else Path.__dict__["read_bytes"](self).decode()))
    with pytest.raises(AssertionError, match="dicom_node.store imports dicom_node.lab.phantom"):
        test_no_module_imports_a_layer_above_it()
