"""Provenance: which package code a stage depends on, and hashes of it.

Snakemake's ``code`` rerun trigger sees only a rule's own script.  Each rule
therefore carries ``code_fingerprint('precip_cvae.<stage>')`` in its params: a
hash of the code of that module and of every package module it imports,
directly or transitively.  Editing ``events.py`` changes the fingerprint of
``detect_events`` (and of stages that import it) and of nothing else.

The code is hashed, not the text (:func:`code_digest`): the syntax tree without
docstrings, line numbers or comments, so a comment, docstring or formatting edit
reruns nothing while any change of behaviour does.

This module imports nothing heavy: the Snakefile calls it at parse time.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "precip_cvae"


@lru_cache(maxsize=1)
def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(spec.origin).parent


def _module_file(name: str) -> Path | None:
    """The source file of package module ``name`` (found without importing it)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = _package_dir().joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _stamp(path: Path) -> tuple[int, int]:
    """What the caches below are keyed on besides the path: a file edited in place is read again."""
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=None)
def _analyse(path_text: str, stamp: tuple[int, int]) -> tuple[tuple, str]:
    """One parse of a file: its import statements as (level, module, names) and its code digest."""
    tree = ast.parse(Path(path_text).read_text(), filename=path_text)
    statements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.extend((0, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            statements.append((node.level, node.module or "", tuple(a.name for a in node.names)))
    digest = hashlib.sha256(ast.dump(_without_docstrings(tree), include_attributes=False).encode()).hexdigest()
    return tuple(statements), digest


def _imports(path: Path, module: str) -> frozenset[str]:
    """Package-internal modules imported by the file at ``path`` (module ``module``)."""
    statements, _ = _analyse(str(path), _stamp(path))
    base = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for level, name, names in statements:
        if level:
            parts = base.split(".")
            parent = ".".join(parts[: len(parts) - (level - 1)])
            target = f"{parent}.{name}" if name else parent
        else:
            target = name
        if target.split(".")[0] != PACKAGE:
            continue
        found.add(target)
        for alias in names:  # `from . import io` imports a submodule
            candidate = f"{target}.{alias}"
            if _module_file(candidate) is not None:
                found.add(candidate)
    return frozenset(found)


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every package module it imports, transitively (sorted)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imports(path, name) - seen)
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return tuple(sorted(seen))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstring of the module and of every class and function removed."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(path: Path) -> str:
    """SHA-256 of the code of the Python file ``path``: ``ast.dump`` of its syntax tree without
    docstrings (no comments, no line numbers), so only a change of behaviour changes it."""
    return _analyse(str(path), _stamp(path))[1]


def clear_caches() -> None:
    """Forget every cached closure and digest (tests that point the package somewhere else)."""
    for cached in (_package_dir, _analyse, module_closure):
        getattr(cached, "cache_clear", lambda: None)()  # _package_dir may be a test's stand-in


def code_fingerprint(*modules: str) -> str:
    """SHA-256 (16 hex digits) of the code (:func:`code_digest`) of ``modules`` and their package imports."""
    digest = hashlib.sha256()
    names = sorted({m for mod in modules for m in module_closure(mod)})
    for name in names:
        digest.update(name.encode())
        digest.update(code_digest(_module_file(name)).encode())
    return digest.hexdigest()[:16]


def script_modules(script: str | Path) -> tuple[str, ...]:
    """The package modules a workflow script imports, and theirs, transitively (sorted): what the
    rule that runs ``script`` depends on."""
    path = Path(script)
    direct = _imports(path, "__script__")  # scripts import the package absolutely
    return tuple(sorted({m for name in direct for m in module_closure(name)}))


def script_fingerprint(script: str | Path) -> str:
    """:func:`code_fingerprint` of everything ``script`` imports from the package (a rule's rerun trigger;
    derived from the script so that the two cannot drift)."""
    return code_fingerprint(*script_modules(script))


def canonical(value):
    """``value`` with every mapping's keys sorted, recursively (lists keep their order)."""
    if isinstance(value, dict):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def canonicalise_config(config: dict) -> dict:
    """Put ``config`` (validated, so the schema's defaults are filled in) in canonical form in place.

    Snakemake compares a rule's ``params`` in their serialised form, so the same values with keys in
    another order, or a default written out (which the schema validation appends at the end), would
    rerun the rule. With every mapping sorted, neither changes anything.
    """
    sorted_config = canonical(config)
    config.clear()
    config.update(sorted_config)
    return config


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Full SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
