"""The dependency rule of docs/architecture.md, checked on every import of the code (function-level ones too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
OFF_CORE = {"testing", "demo"}  # reached from the core only by name (model/sources.py, scoring.py)


def layers() -> dict[str, int]:
    """{unit: layer} from the table between the layer markers of docs/architecture.md."""
    block = re.search(r"<!-- layers:.*?```text\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert block, "docs/architecture.md lost its layer table"
    table = {}
    for line in block.group(1).strip().splitlines():
        number, *units = line.split()
        table.update({unit: int(number) for unit in units})
    return table


def imports(package: str) -> list[tuple[str, str, int]]:
    """(importing file, imported llava_kit module, line) for every import of a llava_kit module in `package`."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [(str(path.relative_to(REPO)), name, node.lineno) for name in names
                      if name == "llava_kit" or name.startswith("llava_kit.")]
    return found


def unit_of(module: str) -> str:
    """`llava_kit.model.vision` -> `model`; `llava_kit.cli` -> `cli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llava_kit"


def test_every_package_is_in_the_layer_table():
    table = layers()
    units = {p.stem if p.is_file() else p.name for p in (REPO / "llava_kit").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert units == set(table), f"in the code, not the table: {units - set(table)}; stale: {set(table) - units}"


def test_packages_import_only_from_lower_layers():
    table = layers()
    broken = []
    for file, module, line in imports("llava_kit"):
        importer, imported = unit_of(file.replace("/", ".").removesuffix(".py")), unit_of(module)
        if importer == "llava_kit" or importer == imported:
            continue  # the package's __init__ (version only), or a module of the same package
        if table[imported] >= table[importer]:
            broken.append(f"{file}:{line} ({importer}, layer {table[importer]}) imports {module} "
                          f"({imported}, layer {table[imported]})")
        elif imported in OFF_CORE and table[importer] < table["demo"]:
            broken.append(f"{file}:{line} imports {module}: the core reaches it only by name")
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_data_gen_stays_free_of_the_heavy_layers():
    allowed = {"llava_kit.errors", "llava_kit.schema"}
    broken = [f"{file}:{line} imports {module}" for file, module, line in imports("data_gen") if module not in allowed]
    assert not broken, "data_gen must start without torch:\n" + "\n".join(broken)
