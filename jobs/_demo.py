"""The demo corpus: docstrings of the running interpreter's standard library.

Every machine with Python has it, it needs no network, and it is real technical prose of
very mixed lengths (one-line helpers to long module guides), which exercises chunking.
One document per module: the module docstring followed by its public classes' and
functions' docstrings.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo",
              "__pycache__", "ensurepip", "pydoc_data", "encodings"}

DEMO_QUERIES = (
    "how do I parse command line arguments",
    "compress a file with gzip",
    "run a function in a thread pool",
    "read and write CSV files",
)


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _document(path: Path) -> tuple[str, str, int] | None:
    """(title, text, number of documented definitions) of a module, or None if undocumented."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    head = ast.get_docstring(tree) or ""
    parts = [head] if head else []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{node.name}: {doc}")
    if not head:
        return None
    title = head.strip().splitlines()[0][:200]
    return title, "\n\n".join(parts), len(parts) - 1


def build_stdlib_corpus(out: Path) -> int:
    """Write the corpus as JSON Lines (`id`, `title`, `text`, `definitions`); return its size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(root.rglob("*.py")):
        rel_parts = set(path.relative_to(root).parts)
        if rel_parts & SKIP_PARTS or any(p.startswith("test") for p in rel_parts):
            continue
        doc = _document(path)
        if doc is None:
            continue
        title, text, definitions = doc
        rows.append({"id": _module_name(root, path), "title": title, "text": text,
                     "definitions": definitions})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def demo_spec(corpus: Path, table: Path) -> dict:
    """The spec the demo runs: everything defaulted but the source and the table."""
    return {
        "kind": "embed",
        "source": {"uri": str(corpus), "id_field": "id", "text_fields": ["text"],
                   "records_per_shard": 100},
        "table": str(table),
        "write": {"mode": "overwrite"},
    }


if __name__ == "__main__":  # pragma: no cover
    print(build_stdlib_corpus(Path(sys.argv[1])))
