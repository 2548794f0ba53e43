"""A griffe extension: kerasbn's docstring conventions, as mkdocstrings renders them.

kerasbn's docstrings follow Google style with three habits of their own, which
griffe's Google parser does not know. Before parsing, this rewrites:

* ``Example:`` (singular) as ``Examples:``, so that the doctest renders as code;
* ``Call arguments:`` items (a layer's call) as a Markdown list;
* ``a, b: description`` under ``Args:`` as one item per name, so that each
  row of the table gets its own annotation from the signature.

Only the documentation site uses it (mkdocs.yml); the docstrings are unchanged.
"""

from __future__ import annotations

import re

import griffe

__all__ = ["KerasbnDocstrings"]

_SECTION = re.compile(r"^(?P<indent> *)(?P<title>[A-Z][\w ]*):\s*$")
_ITEM = re.compile(r"^(?P<indent> +)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$")
_CALL_ITEM = re.compile(r"^(?P<indent> +)(?P<name>\w+): (?P<text>.*)$")


def rewrite(text: str) -> str:
    """The docstring ``text`` in the form griffe's Google parser renders well."""
    out: list[str] = []
    section, section_indent = "", 0
    shared: tuple[str, list[str], list[str]] | None = None  # indent, names, lines

    def flush() -> None:
        nonlocal shared
        if shared is not None:
            indent, names, lines = shared
            for name in names:
                out.append(f"{indent}{name}: {lines[0]}")
                out.extend(lines[1:])
            shared = None

    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if shared is not None and line.strip() and indent > len(shared[0]):
            shared[2].append(line)  # a continuation line of an item of several names
            continue
        flush()
        heading = _SECTION.match(line)
        if heading:
            section, section_indent = (
                heading.group("title"),
                len(heading.group("indent")),
            )
            if section == "Example":
                line = f"{heading.group('indent')}Examples:"
            out.append(line)
            continue
        if line.strip() and indent <= section_indent:
            section = ""  # back at the section's own level: the section ended
        if section == "Args" and (item := _ITEM.match(line)):
            names = item.group("names").split(", ")
            shared = (item.group("indent"), names, [item.group("text")])
            continue
        if section == "Call arguments":
            call_item = _CALL_ITEM.match(line)
            if call_item and len(call_item.group("indent")) == section_indent + 4:
                name = call_item.group("name")
                out.append(
                    f"{call_item.group('indent')}- `{name}`: {call_item.group('text')}"
                )
                continue
        out.append(line)
    flush()
    return "\n".join(out)


class KerasbnDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded object with :func:`rewrite`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
