"""The HTML pieces of a self-contained page (`dyco_probe.report`): Markdown as HTML, figures embedded as
PNG, tables, JSON, notes, and the style sheet. Nothing is fetched when the page opens.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re

__all__ = [
    "CSS",
    "png_figure_html",
    "json_html",
    "markdown_html",
    "missing",
    "note",
    "png_html",
    "table_html",
]


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return text


def markdown_html(text: str) -> str:
    """The markdown the analyses write (headings, pipe tables, bullet lists, paragraphs, `code`,
    **bold**) as HTML; everything else is escaped text."""
    out, para, items = [], [], []
    lines = text.splitlines()

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c or "--") for c in r)]
            if body:
                head, rest = body[0], body[1:]
                out.append(
                    "<table><thead><tr>"
                    + "".join(f"<th>{_inline(c)}</th>" for c in head)
                    + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                    + "</tbody></table>"
                )
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            level = min(len(m.group(1)) + 2, 6)  # nested under the report's own headings
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif re.match(r"^\s*[-*]\s+", line):
            if para:
                flush()
            items.append(re.sub(r"^\s*[-*]\s+", "", line))
        elif not line.strip():
            flush()
        elif items and line.startswith("  "):
            items[-1] += " " + line.strip()
        else:
            if items:
                flush()
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def png_html(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def png_figure_html(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    return f"<figure>{png_html(buffer.getvalue(), alt)}</figure>"


def table_html(frame, digits: int = 3) -> str:
    def fmt(x):
        if isinstance(x, float):
            return "–" if not math.isfinite(x) else f"{x:.{digits}f}"
        return x

    return frame.map(fmt).to_html(index=False, escape=True, border=0, classes="data", na_rep="–")


def json_html(value) -> str:
    return "<pre>" + html.escape(json.dumps(value, indent=2, default=str)) + "</pre>"


def missing(what: str, command: str) -> str:
    return f'<div class="missing"><b>Not in this run:</b> {html.escape(what)}. Make it with <code>{html.escape(command)}</code>.</div>'


def note(text: str) -> str:
    return f'<div class="note">{text}</div>'


CSS = """
body{font-family:-apple-system,'Segoe UI',DejaVu Sans,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24292f;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cdd}nav{padding:8px 32px;background:#eef1f4;position:sticky;top:0;z-index:10}
nav a{margin-right:16px;color:#0b5394;text-decoration:none;font-size:14px}
main{padding:8px 32px 48px;max-width:1250px}section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 22px;margin:18px 0}
h2{border-bottom:1px solid #eee;padding-bottom:4px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f3f5f7}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#666}
pre{background:#f6f8fa;padding:8px;font-size:12px;overflow:auto;max-height:420px}
code{background:#f1f1f1;padding:0 3px;border-radius:3px}
.missing{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0;font-size:14px}
.note{color:#555;font-size:14px;margin:6px 0}.ok{color:#1b7f3b}.no{color:#b26a00}
.included{border-left:3px solid #dde;padding-left:12px;margin:10px 0}.source{font-size:12px;color:#888}
.plot{margin:12px 0;border:1px solid #eee}
"""
