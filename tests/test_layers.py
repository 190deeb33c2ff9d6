"""Layers import only downward: a module never imports (at the top or inside a function) from a layer above it,
and the two stages on one layer, prompt learning and evaluation, do not import each other."""

import ast
from pathlib import Path

import ctp

SRC = Path(ctp.__file__).parent

# lowest first; a module belongs to the first layer one of whose prefixes it starts with
LAYERS = [
    ["ctp.errors", "ctp.logs", "ctp.devices", "ctp.distributed", "ctp.io", "ctp.models.names"],
    ["ctp.models", "ctp.data"],
    ["ctp.compress", "ctp.lm"],
    ["ctp.prompt", "ctp.eval"],
    ["ctp.experiments", "ctp.integrations"],
    ["ctp.commands", "ctp.cli", "ctp.__main__", "ctp"],
]
SIDEWAYS_FORBIDDEN = [("ctp.prompt", "ctp.eval"), ("ctp.eval", "ctp.prompt")]
# the one upward edge left: loading a model dispatches to the compressed-model format (imported lazily)
ALLOWED = {("ctp.models.load", "ctp.compress.artifact")}


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ctp":  # from ctp import distributed, __version__
            found.update(f"ctp.{a.name}" for a in node.names
                         if (SRC / f"{a.name}.py").is_file() or (SRC / a.name).is_dir())
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ctp"))
    return found


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_import_points_downward():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        src = _module_name(path)
        if src == "ctp":
            continue  # the package's lazy top-level API names every stage
        for dst in _imports(path):
            if (src, dst) in ALLOWED:
                continue
            if _layer(dst) > _layer(src):
                bad.append(f"{src} -> {dst} (upward)")
            for a, b in SIDEWAYS_FORBIDDEN:
                if _in(src, a) and _in(dst, b):
                    bad.append(f"{src} -> {dst} (sideways)")
    assert not bad, "\n".join(bad)
