"""What a benchmark row measured, as a hash: a row whose code changed is stale and is run
again, never kept.  Python modules count by their syntax tree without docstrings (a
reworded docstring measures nothing new); other sources by their bytes."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (".py", ".h", ".cc", ".yaml")


def code_text(f: Path) -> bytes:
    if f.suffix != ".py":
        return f.read_bytes()
    tree = ast.parse(f.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def hash_files(files: Iterable[Path], root: Path = ROOT) -> str:
    """SHA-256 (16 hex digits) of the files, in the order given, with their paths."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + code_text(f))
    return h.hexdigest()[:16]


def expand(patterns: Iterable[str], skip: tuple = (), root: Path = ROOT) -> list[Path]:
    """The source files under each pattern (a file, a folder, or a glob), in a fixed order."""
    out = []
    for pattern in patterns:
        hits = sorted(root.glob(pattern)) if "*" in pattern else [root / pattern]
        for top in hits:
            files = sorted(top.rglob("*")) if top.is_dir() else [top]
            out += [f for f in files if f.is_file() and f.suffix in SOURCES
                    and f.name not in skip and "__pycache__" not in f.parts]
    return out
