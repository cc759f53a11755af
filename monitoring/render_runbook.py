"""Render monitoring/runbook.md as the HTML page Prometheus serves at /prometheus/consoles/runbook.html.

Alerts link to ``<Prometheus's external URL>/consoles/runbook.html#<alert name in lower case>``:
an absolute link that works from a notification, Prometheus and Grafana alike, on the stack
itself (behind :8443's basic auth), with no repository URL to configure. Prometheus serves
the files of ``--web.console.templates`` as pages; this one holds no template action.

Only the Markdown the runbook uses: ``#``/``##`` headings, paragraphs, ``- `` lists whose
items continue on indented lines, ``**bold**``, ```code``` and ``[text](link)``.
Run ``python3 monitoring/render_runbook.py`` after editing the runbook;
tests/deploy/test_monitoring.py fails while the page and the runbook differ.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

__all__ = ["render"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "runbook.md"
PAGE = HERE / "consoles" / "runbook.html"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        escaped = html.escape(part, quote=False)
        escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
        escaped = re.sub(
            r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', escaped
        )
        out.append(escaped)
    return "".join(out)


def render(markdown: str) -> str:
    body: list[str] = []
    paragraph: list[str] = []
    items: list[list[str]] = []

    def flush() -> None:
        if paragraph:
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{_inline(' '.join(item))}</li>" for item in items) + "</ul>")
            items.clear()

    for line in markdown.splitlines():
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            title = line[level:].strip()
            body.append(f'<h{level} id="{_anchor(title)}">{_inline(title)}</h{level}>')
        elif line.startswith("- "):
            if paragraph:
                flush()
            items.append([line[2:].strip()])
        elif line.startswith("  ") and items:
            items[-1].append(line.strip())
        else:
            if items:
                flush()
            paragraph.append(line.strip())
    flush()
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>WebSocket Bridge runbook</title>'
        "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto;padding:0 1em;line-height:1.45}"
        "code{background:#eee;padding:0 .2em}h2{border-top:1px solid #ccc;padding-top:1em}</style></head>\n<body>\n"
        "<!-- Generated from monitoring/runbook.md by monitoring/render_runbook.py: edit the Markdown. -->\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


if __name__ == "__main__":
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(render(SOURCE.read_text()))
    sys.stdout.write(f"wrote {PAGE}\n")
