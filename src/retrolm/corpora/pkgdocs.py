"""builtin:pkgdocs: docstrings of the installed scientific Python stack.

Natural English mixed with code, with real cross-document redundancy: the model classes
of transformers share templated documentation under different names, and numpy, scipy
and torch document overlapping functions. A fixed list of packages (`PACKAGES`) is used,
whichever of them are installed; they are located with `importlib.util.find_spec` (which
does not run the package) and their source files are parsed with `ast`, never imported.

One document per docstring of at least `MIN_CHARS` characters: modules, classes, functions
and methods, private and nested ones included (their docstrings are English prose too),
also those defined under `if`/`try`/`with` blocks. The id is the qualified name, e.g.
`transformers.models.bert.modeling_bert.BertModel.forward`, with `#2`, `#3` … when a name
repeats (a property and its setter; a function in a package's `__init__` named like one
of its submodules). Order is deterministic: packages in `PACKAGES` order, modules sorted
by dotted name, objects in source order. Test directories, test infrastructure and
vendored third-party code are skipped. `sources()` gives {distribution: version} of the
packages read; the database build records it in manifest.json.
"""

from __future__ import annotations

import ast
import gc
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from retrolm.corpora.reader import Document

# (import name, distribution name), in the order documents are emitted.
PACKAGES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("sympy", "sympy"),
    ("matplotlib", "matplotlib"),
    ("huggingface_hub", "huggingface-hub"),
    ("pyarrow", "pyarrow"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("faiss", "faiss-cpu"),
    ("bm25s", "bm25s"),
    ("datasketch", "datasketch"),
    ("typer", "typer"),
    ("rich", "rich"),
    ("tqdm", "tqdm"),
    ("fastapi", "fastapi"),
    ("uvicorn", "uvicorn"),
)
# Directory names never descended into: tests, benchmarks, vendored third-party code.
SKIP_PARTS = frozenset({
    "test", "tests", "_tests", "benchmarks", "__pycache__", "_vendor", "vendored", "_vendored",
    "externals", "array_api_compat", "array_api_extra", "pyprima", "cobyqa", "_uarray",
})
# Dotted module prefixes skipped (test infrastructure that is not in a tests/ folder).
SKIP_MODULES = ("torch.testing._internal",)
MIN_CHARS = 200

_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.If, ast.Try, ast.With, ast.AsyncWith) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


def _installed(packages: Iterable[str] | None = None) -> list[tuple[str, str, str, list[Path]]]:
    """(import name, distribution, version, package directories) of each installed package.

    `find_spec` of a top-level name only consults the finders: the package does not run.
    """
    wanted = None if packages is None else set(packages)
    out = []
    for name, dist in PACKAGES:
        if wanted is not None and name not in wanted:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        roots = sorted({Path(p) for p in spec.submodule_search_locations if Path(p).is_dir()})
        if roots:
            out.append((name, dist, version, roots))
    return out


def sources(packages: Iterable[str] | None = None) -> dict[str, str]:
    """{distribution: version} of the installed packages that `documents()` reads."""
    return {dist: version for _, dist, version, _ in _installed(packages)}


def _module_files(name: str, root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every .py file of package `name` under `root`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_PARTS and d.isidentifier()]
        rel = Path(dirpath).relative_to(root).parts
        prefix = ".".join((name, *rel))
        if prefix.startswith(SKIP_MODULES):
            dirnames[:] = []
            continue
        for f in filenames:
            stem = f[:-3]
            if not f.endswith(".py") or not stem.isidentifier():
                continue
            module = prefix if stem == "__init__" else f"{prefix}.{stem}"
            if not module.startswith(SKIP_MODULES):
                out.append((module, Path(dirpath, f)))
    out.sort(key=lambda item: item[0].split("."))
    return out


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module and every definition in it, source order."""
    out: list[tuple[str, str]] = []

    def visit_body(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, _DEFS):
                visit(node, f"{prefix}.{node.name}")
            elif isinstance(node, _BLOCKS):
                for block in (getattr(node, "body", []), getattr(node, "orelse", []),
                              getattr(node, "finalbody", [])):
                    visit_body(block, prefix)
                for handler in getattr(node, "handlers", []):
                    visit_body(handler.body, prefix)

    def visit(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_CHARS:
            out.append((name, doc))
        visit_body(node.body, name)

    visit(tree, module)
    return out


def documents(packages: Iterable[str] | None = None) -> list[Document]:
    """One document per long docstring of the installed `PACKAGES` (or the named subset).

    ~7k files / ~140 MB of source for the full list; `ast.parse` dominates. The cyclic
    garbage collector is paused meanwhile (AST nodes hold no cycles, reference counting
    frees each tree): the parser allocates millions of tracked objects and the collector
    would otherwise run thousands of times, about 20% of the parse time.
    """
    docs: list[Document] = []
    seen: dict[str, int] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning: invalid escape sequences in old code
            for name, _, _, roots in _installed(packages):
                files = sorted((item for root in roots for item in _module_files(name, root)),
                               key=lambda item: item[0].split("."))
                for module, path in files:
                    try:
                        tree = ast.parse(path.read_bytes(), filename=str(path))
                    except (SyntaxError, ValueError, OSError):
                        continue
                    for qualname, doc in _docstrings(tree, module):
                        n = seen[qualname] = seen.get(qualname, 0) + 1
                        doc_id = qualname if n == 1 else f"{qualname}#{n}"
                        docs.append(Document(doc_id, doc, title=qualname))
    finally:
        if gc_was_enabled:
            gc.enable()
    return docs
