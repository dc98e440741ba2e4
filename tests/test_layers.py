"""The layer rule, checked: every import between dmlsys packages points downward.

Every module's imports are read with ``ast`` (inside functions too, where a lazy import hides
from a reader). A package may import itself and any package of a lower layer; an import that
goes upward or sideways (same layer, another package) fails the test, unless docs/architecture.md
lists it, with its reason, in the table under "Exceptions to the layer rule".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmlsys"

# Lowest first. Packages in one layer may not import each other. Keep in step with the
# picture in docs/architecture.md.
LAYERS: list[set[str]] = [
    {"arrays"},
    {"wire"},
    {"node"},
    {"train", "workflow"},
    {"collective", "ps", "sharding", "events"},
    {"serving"},
    {"assembly"},
    {"pipeline"},
    {"cluster"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dmlsys" else None


def imports(path: Path) -> list[tuple[str, int]]:
    """Every dmlsys module ``path`` imports (absolute or relative), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if here.endswith(".__init__"):
        here = here[: -len(".__init__")] + ".__init__"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
    return [(m, line) for m, line in found if m.startswith("dmlsys.") or m == "dmlsys"]


def documented_exceptions() -> set[tuple[str, str]]:
    """(importer, imported) package pairs from docs/architecture.md's exceptions table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Exceptions to the layer rule", 1)[1].split("\n## ", 1)[0]
    pairs = set()
    for row in re.finditer(r"^\|\s*`dmlsys\.(\w+)`\s*\|\s*`dmlsys\.(\w+)`\s*\|\s*(.+?)\s*\|\s*$", section, re.M):
        assert row.group(3).strip(), f"the exception {row.group(1)} -> {row.group(2)} needs a reason"
        pairs.add((row.group(1), row.group(2)))
    return pairs


def violations() -> list[str]:
    allowed = documented_exceptions()
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        assert me in RANK, f"dmlsys/{rel}: package {me!r} has no layer: add it to LAYERS and docs/architecture.md"
        for module, line in imports(path):
            other = package_of(module)
            if other is None or other == me or (me, other) in allowed:
                continue
            assert other in RANK, f"dmlsys/{rel}:{line} imports {module}, whose package has no layer"
            if RANK[other] >= RANK[me]:
                way = "sideways" if RANK[other] == RANK[me] else "upward"
                bad.append(f"dmlsys/{rel}:{line}: {me} imports {module} ({way})")
    return bad


def test_every_import_between_packages_points_downward():
    bad = violations()
    assert not bad, "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_every_documented_exception_is_still_needed():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        me = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        used |= {(me, package_of(m)) for m, _ in imports(path)}
    stale = documented_exceptions() - used
    assert not stale, f"docs/architecture.md lists exceptions nothing needs any more: {sorted(stale)}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The rule would be toothless if an import inside a function slipped past it.
    src = tmp_path / "dmlsys" / "node" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from dmlsys.serving import balancer\n    from ..cluster import spec\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = [m for m, _ in imports(src)]
    finally:
        ROOT = saved
    assert found == ["dmlsys.serving", "dmlsys.cluster"]
