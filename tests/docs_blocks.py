"""The Python code blocks of kerasbn's Markdown pages, and what each one claims.

Standard library only, so that it also serves outside the test suite: CI runs
``python tests/docs_blocks.py README.md --section "Quick start"`` to print the
README's quick start and run it in a fresh virtual environment that holds the
built wheel and nothing else of this repository. ``--serve`` makes it the
worker process in which ``tests/test_docs.py`` runs the blocks, so that what
a block changes (Keras's global state, random generators, a framework's
runtime) never reaches the rest of the suite.

The convention (also in CONTRIBUTING.md):

* Every fenced block whose language is ``python`` runs as a test, on all
  three Keras backends, alone: in a fresh namespace and an empty working
  directory. It must be self-contained (its own imports, synthetic data) and
  take seconds.
* An HTML comment on the line right before the opening fence (blank lines
  between are allowed; the comment does not render) changes that:

  ``<!-- docs-test: backends tensorflow jax -->``
      runs the block on these backends only (names separated by spaces).
  ``<!-- docs-test: process -->``
      runs the block in a fresh Python process, for a block that sets up
      process-wide state (a ``tf.distribute`` strategy, a
      ``keras.distribution``, a ``torch.distributed`` process group). It
      combines with ``backends``: ``<!-- docs-test: backends jax process -->``.
  ``<!-- docs-test: skip because ... -->``
      never runs it; the reason after ``skip`` is required and is shown as
      the test's skip reason. Use it sparingly.

* Blocks in other languages (``bash``, ``text``) are not run. A block marked
  ``py``, ``python3``, ``pycon`` or ``ipython`` is an error: write ``python``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
import traceback

__all__ = [
    "BACKENDS",
    "Block",
    "ConventionError",
    "blocks",
    "documentation_files",
    "main",
    "serve",
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
# Languages that are Python but spelled otherwise: refused, so that no block
# escapes the test by its spelling.
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "pyi"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


class ConventionError(ValueError):
    """A page breaks the convention (a malformed marker, a misspelled language)."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One Python code block of a page.

    Attributes:
        path: the page, relative to the repository root.
        line: the line of the opening fence (1-based).
        section: the text of the nearest heading above the block.
        code: the block's source, dedented to the fence's indentation.
        backends: the backends it runs on (all three unless a marker says).
        skip: the reason it is never run, or None.
        process: whether it runs in a fresh Python process.
    """

    path: str
    line: int
    section: str
    code: str
    backends: tuple[str, ...]
    skip: str | None
    process: bool = False

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def documentation_files() -> list[pathlib.Path]:
    """The pages whose blocks run: the README, CONTRIBUTING, benchmarks' README, docs/."""
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "benchmarks/README.md",
    ]
    pages += sorted((ROOT / "docs").rglob("*.md"))
    return [page for page in pages if page.exists()]


def _parse_marker(body: str, where: str) -> tuple[tuple[str, ...], str | None, bool]:
    """``(backends, skip reason, process)`` from a marker's text."""
    words = body.split()
    if words and words[0] == "skip":
        reason = body[len("skip") :].strip()
        if not reason:
            raise ConventionError(
                f"{where}: `docs-test: skip` needs a reason, e.g. "
                "`<!-- docs-test: skip because it needs two machines -->`."
            )
        return BACKENDS, reason, False
    backends: tuple[str, ...] | None = None
    process = False
    i = 0
    while i < len(words):
        if words[i] == "process" and not process:
            process, i = True, i + 1
        elif words[i] == "backends" and backends is None:
            names = []
            i += 1
            while i < len(words) and words[i] in BACKENDS:
                names.append(words[i])
                i += 1
            if not names or (i < len(words) and words[i] != "process"):
                raise ConventionError(
                    f"{where}: `docs-test: backends` takes one or more of "
                    f"{' '.join(BACKENDS)}; got {body!r}."
                )
            backends = tuple(names)
        else:
            raise ConventionError(
                f"{where}: unknown marker {body!r}; use `docs-test: backends "
                "NAME...`, `docs-test: process` (or both), or `docs-test: skip "
                "because ...`."
            )
    return backends or BACKENDS, None, process


def blocks(path: pathlib.Path) -> list[Block]:
    """The Python blocks of the page at ``path``, with what their markers say.

    Raises:
        ConventionError: a marker is malformed or is not followed by a Python
            block, or a block's language is a misspelling of ``python``.
    """
    relative = path.resolve().relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    section = ""
    marker: tuple[int, tuple[str, ...], str | None, bool] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        where = f"{relative}:{i + 1}"
        heading = _HEADING.match(line)
        marked = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marked:
            if marker is not None:
                raise ConventionError(f"{where}: two markers in a row.")
            marker = (i + 1, *_parse_marker(marked.group("body"), where))
        elif fence:
            indent, ticks = fence.group("indent"), fence.group("fence")
            language = fence.group("info").split()[0] if fence.group("info") else ""
            body, j = [], i + 1
            closing = re.compile(rf"^[ \t]*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
            while j < len(lines) and not closing.match(lines[j]):
                text = lines[j]
                body.append(text[len(indent) :] if text.startswith(indent) else text)
                j += 1
            if language.lower() in PYTHON_ALIASES:
                raise ConventionError(
                    f"{where}: the block's language is {language!r}; write `python` "
                    "so that the docs test runs it (or `text` for output)."
                )
            if language == "python":
                backends, skip, process = BACKENDS, None, False
                if marker is not None:
                    backends, skip, process = marker[1:]
                code = "\n".join(body) + "\n"
                found.append(
                    Block(relative, i + 1, section, code, backends, skip, process)
                )
            elif marker is not None:
                raise ConventionError(
                    f"{relative}:{marker[0]}: a docs-test marker must come right "
                    f"before a ```python block; the next block is {language!r}."
                )
            marker = None
            i = j + 1
            continue
        elif heading and marker is None:
            section = heading.group(2)
        elif line.strip() and marker is not None:
            raise ConventionError(
                f"{relative}:{marker[0]}: a docs-test marker must come right "
                "before a ```python block."
            )
        i += 1
    if marker is not None:
        raise ConventionError(
            f"{relative}:{marker[0]}: a marker with no block after it."
        )
    return found


def serve() -> None:
    """Runs blocks sent on stdin, one JSON request a line, answering on stdout.

    A request is ``{"name", "code", "cwd"}``; the answer ``{"ok": true}`` or
    ``{"ok": false, "error": traceback}``. Each block runs in a fresh
    namespace, in ``cwd``; afterwards Keras's float type, dtype policy and
    distribution are set back. What the blocks print goes to stderr.
    """
    import keras

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints of the blocks, Python's or a library's, go to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
        try:
            os.chdir(request["cwd"])
            code = compile(request["code"], request["name"], "exec")
            exec(code, {"__name__": "__main__"})
            answer = {"ok": True}
        except BaseException:  # noqa: BLE001 - every failure is the block's answer
            answer = {"ok": False, "error": traceback.format_exc()[-4000:]}
        finally:
            keras.config.set_floatx(floatx)
            keras.config.set_dtype_policy(policy)
            if hasattr(keras.distribution, "set_distribution"):
                keras.distribution.set_distribution(None)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv: list[str] | None = None) -> int:
    """Prints the code of a page's blocks (in one section, if given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", help="a Markdown file, from the root")
    parser.add_argument("--section", help="only the blocks under this heading")
    parser.add_argument("--serve", action="store_true", help="run blocks from stdin")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.page is None:
        parser.error("give a page, or --serve")
    selected = [
        block
        for block in blocks(ROOT / args.page)
        if args.section is None or block.section == args.section
    ]
    if not selected:
        print(f"no python block in {args.page} {args.section or ''}", file=sys.stderr)
        return 1
    print("\n".join(block.code for block in selected), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
