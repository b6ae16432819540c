"""A griffe extension for the documentation build: the reStructuredText markup of adoptim's docstrings as Markdown.

The docstrings follow torch.optim's conventions (the algorithm as a ``.. math::`` block, ``:math:`` and
``:class:`` roles, ``Example::`` literal blocks, a simple table), which read well in the source and in
``help()``. mkdocstrings renders docstrings as Markdown, so before it does, this rewrites:

- ``.. math::`` blocks into ``$$ ... $$`` and ``:math:`x``` into ``$x$`` (rendered by pymdownx.arithmatex);
- ``:class:`~a.b.C``` and the other cross-reference roles into code spans (``C``; the full path without ``~``);
- a line ending in ``::`` and the indented block after it into a fenced code block (``Example::`` becomes
  an ``Examples:`` section, which griffe parses into its ``>>>`` code);
- simple tables (``====  ====`` rules) into Markdown tables.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|ref):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_TABLE_RULE = re.compile(r"^\s*=+(?: +=+)+\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> int:
    """Index after the block of lines indented deeper than ``base`` that starts at ``start`` (blank lines inside)."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _dedent(lines: list[str]) -> list[str]:
    width = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[width:] for line in lines]


def _table(lines: list[str]) -> list[str]:
    """A simple reStructuredText table (rule, header, rule, rows, rule) as a Markdown table."""
    rule = lines[0]
    spans, col = [], None
    for i, ch in enumerate(rule + " "):
        if ch == "=" and col is None:
            col = i
        elif ch != "=" and col is not None:
            spans.append((col, i))
            col = None
    starts = [s for s, _ in spans] + [None]

    def cells(line: str) -> list[str]:
        return [line[a:b].strip().replace("|", "\\|") for a, b in zip(starts[:-1], starts[1:])]

    body = [line for line in lines if line.strip() and not _TABLE_RULE.match(line)]
    pad = " " * _indent(rule)
    out = [pad + "| " + " | ".join(cells(body[0])) + " |", pad + "|" + " --- |" * len(spans)]
    out += [pad + "| " + " | ".join(cells(line)) + " |" for line in body[1:]]
    return out


def rst_to_markdown(text: str) -> str:
    """Rewrite the reStructuredText markup described in the module docstring; other text is kept."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        pad = " " * _indent(line)
        if stripped == ".. math::":
            end = _block(lines, i + 1, _indent(line))
            out += [pad + "$$"] + [pad + x for x in _dedent(lines[i + 1:end]) if x.strip()] + [pad + "$$"]
            i = end
            continue
        if _TABLE_RULE.match(line):
            end = i + 1
            rules = 1
            while end < len(lines) and lines[end].strip() and rules < 3:
                rules += bool(_TABLE_RULE.match(lines[end]))
                end += 1
            if rules == 3:
                out += _table(lines[i:end])
                i = end
                continue
        if stripped.endswith("::") and i + 1 < len(lines):
            end = _block(lines, i + 1, _indent(line))
            code = _dedent(lines[i + 1:end])
            if any(x.strip() for x in code):
                while not code[0].strip():
                    code.pop(0)  # griffe reads a section only when its body follows the title at once
                if stripped in ("Example::", "Examples::"):
                    out.append(pad + "Examples:")
                    out += ["    " + pad + x if x.strip() else "" for x in code]
                else:
                    head = stripped[:-2].rstrip()
                    out.append(pad + head + ":" if head else "")
                    lang = "python" if any(x.lstrip().startswith(">>>") for x in code) else "text"
                    out += ["", pad + "```" + lang] + [pad + x if x.strip() else "" for x in code] + [pad + "```"]
                i = end
                continue
        line = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", line)
        line = _ROLE.sub(lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", line)
        out.append(line)
        i += 1
    return "\n".join(out)


class RstMarkup(griffe.Extension):
    """Rewrites every loaded docstring with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
