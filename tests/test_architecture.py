"""Architecture rules import-linter cannot state: jobs/ and cluster/ (scripts, not packages) use only the
public API; the library contract in pyproject.toml names every library module; `import distcls` is light."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import distcls

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"distcls.cli", "distcls.config", "distcls.storage"}  # plus distcls itself and distcls.tools.*


def distcls_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every import of distcls in a file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "distcls"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distcls":
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def is_public(module: str, name: str | None) -> bool:
    if module == "distcls":
        return name in distcls.__all__ or f"distcls.{name}" in PUBLIC_MODULES or name == "tools"
    return module in PUBLIC_MODULES or module == "distcls.tools" or module.startswith("distcls.tools.")


def test_jobs_and_cluster_use_only_the_public_api():
    scripts = sorted((ROOT / "jobs").glob("*.py")) + sorted((ROOT / "cluster").glob("*.py"))
    assert len(scripts) >= 5
    private = [
        f"{p.relative_to(ROOT)}:{line} imports {module}" + (f".{name}" if name else "")
        for p in scripts
        for line, module, name in distcls_imports(p)
        if not is_public(module, name)
    ]
    assert not private, "use distcls's public names (distcls.__all__) instead:\n" + "\n".join(private)


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "job.py"
    bad.write_text("def f():\n    from distcls.train.loop import build_optimizer\n")
    assert [(m, n) for _, m, n in distcls_imports(bad) if not is_public(m, n)] == [("distcls.train.loop", "build_optimizer")]


def test_library_contract_names_every_library_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(
        c
        for c in config["tool"]["importlinter"]["contracts"]
        if c["type"] == "forbidden" and c["forbidden_modules"] == ["distcls.tools"]
    )
    package = ROOT / "distcls"
    modules = {f"distcls.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"distcls.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert set(contract["source_modules"]) == modules - {"distcls.cli", "distcls.tools"}


def test_public_names_resolve_and_import_distcls_is_light():
    for name in distcls.__all__:
        assert getattr(distcls, name) is not None, name
    code = "import sys, distcls; print(sorted(m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
