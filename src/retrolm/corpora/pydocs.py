"""builtin:pydocs: docstrings of the installed standard library plus pydoc's topic texts.

Real English text present on every machine. Source files are parsed with `ast`, never
imported, so no module side effects run (GUI toolkits, `this`, `antigravity`). The order
is deterministic: modules sorted by name, objects in source order, then topics by name.
"""

from __future__ import annotations

import ast
import platform
import sysconfig
import warnings
from pathlib import Path

from retrolm.corpora.reader import Document

SKIP_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "dist-packages",
              "__pycache__", "lib2to3", "ensurepip", "venv", "__phello__"}
SKIP_MODULES = {"this", "antigravity", "turtle", "__hello__"}
MIN_CHARS = 40


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module and its classes/functions, source order."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        doc = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ) else None
        if doc and len(doc) >= MIN_CHARS:
            out.append((prefix, doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and not child.name.startswith("__"):
                    continue
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return out


def sources() -> dict[str, str]:
    """What the corpus was read from (recorded in the database manifest)."""
    return {"python": platform.python_version()}


def documents() -> list[Document]:
    """Standard-library docstrings (one document each) followed by pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts))
    for path in files:
        module = _module_name(root, path)
        if not module or module.split(".")[0] in SKIP_MODULES or "-" in module:
            continue
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for name, doc in _docstrings(tree, module):
            docs.append(Document(f"pydocs:{name}", doc, title=name))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_CHARS:
            docs.append(Document(f"pydocs-topic:{name}", text, title=name))
    return docs
