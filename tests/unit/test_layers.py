"""The layering rules, read from the source: the shared package never imports the services, and
vLLM is imported in one module."""
import ast
import pathlib

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).parent.parent.parent
SERVICES = {"router_svc", "worker_svc", "manager_svc"}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {n.split(".")[0] for n in names}


def test_the_shared_package_never_imports_the_services():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & SERVICES) for p in (ROOT / "roundhouse").rglob("*.py")}
    assert {p: s for p, s in offenders.items() if s} == {}


def test_vllm_is_imported_in_one_module_of_the_product():
    product = [p for d in ("roundhouse", *SERVICES) for p in (ROOT / d).rglob("*.py")]
    assert [str(p.relative_to(ROOT)) for p in product if "vllm" in _imports(p)] == ["worker_svc/engine.py"]
