"""A small document model rendered twice: Markdown for terminals and pull requests, one self-contained HTML file
for browsers. Reports and diffs are built once as blocks, so the two formats never disagree."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


@dataclass
class Cell:
    """One cell of an aligned grid; ``bad`` marks a mismatch (prediction != label, or run A != run B)."""

    text: str
    bad: bool = False


@dataclass
class Audio:
    """A sound file in a table cell: in HTML a player, the file inlined as a base64 data URI when ``inline``
    (else a link to it); in Markdown a relative link. ``path`` None: the file was recorded but is not here."""

    name: str
    path: Path | None
    inline: bool = True


_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}


@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, header: list[str], rows: list[list], align_right: bool = True) -> None:
        self.blocks.append(("table", [str(h) for h in header], [[_cell(v) for v in r] for r in rows], align_right))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None:
            self.blocks.append(("image", Path(path), alt))

    def grid(self, caption: str, rows: list[tuple[str, list[Cell]]], note: str = "") -> None:
        """Rows of equally many cells shown as aligned columns; bad cells are marked in both formats."""
        self.blocks.append(("grid", caption, rows, note))

    # ------------------------------------------------------------ Markdown

    def markdown(self, out_dir: Path) -> str:
        parts = [f"# {self.title}"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                parts.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "para":
                parts.append(block[1])
            elif kind == "bullets":
                parts.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                rows = [[_md_audio(c, out_dir) if isinstance(c, Audio) else c for c in r] for r in block[2]]
                parts.append(_md_table(block[1], rows, block[3]))
            elif kind == "code":
                parts.append(f"```\n{block[1]}\n```")
            elif kind == "image":
                parts.append(f"![{block[2]}]({_relative(block[1], out_dir)})")
            elif kind == "grid":
                parts.append(_md_grid(block[1], block[2], block[3]))
        return "\n\n".join(parts) + "\n"

    # ------------------------------------------------------------ HTML

    def html(self, out_dir: Path | None = None) -> str:
        """The page; ``out_dir`` (where it is written) makes links to files that are not inlined relative."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                level = min(block[1], 6)
                body.append(f"<h{level}>{html.escape(block[2])}</h{level}>")
            elif kind == "para":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                body.append(_html_table(block[1], block[2], out_dir))
            elif kind == "code":
                body.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "image":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                body.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
            elif kind == "grid":
                body.append(_html_grid(block[1], block[2], block[3]))
        return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
img{max-width:100%;display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}
table.grid td{font-family:ui-monospace,monospace;font-size:12px}table.grid td.bad{background:#fbd0d0}
table.grid th{text-align:left}.cap{font-weight:600;margin-top:1em}.note{color:#666}
audio{height:32px;width:250px;vertical-align:middle}.missing{color:#b00}
"""


def _cell(value) -> str | Audio:
    if isinstance(value, Audio):
        return value
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return path.resolve().relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _link(path: Path, out_dir: Path | None) -> str:
    """A link to a file from a document in ``out_dir``: relative when possible, else a file:// URI."""
    path = Path(path).resolve()
    if out_dir is None:
        return path.as_uri()
    try:
        return quote(Path(os.path.relpath(path, Path(out_dir).resolve())).as_posix())
    except ValueError:  # another drive on Windows
        return path.as_uri()


def _md_audio(cell: Audio, out_dir: Path) -> str:
    if cell.path is None:
        return f"file missing ({cell.name})"
    return f"[{cell.name}]({_link(cell.path, out_dir)})"


def _html_audio(cell: Audio, out_dir: Path | None) -> str:
    name = html.escape(cell.name)
    missing = f'<span class="missing">file missing</span> <span class="note">{name}</span>'
    if cell.path is None:
        return missing
    if not cell.inline:
        return f'<a href="{html.escape(_link(cell.path, out_dir))}">{name}</a> <span class="note">(not inlined)</span>'
    try:
        data = base64.b64encode(Path(cell.path).read_bytes()).decode("ascii")
    except OSError:
        return missing
    mime = _MIME.get(Path(cell.path).suffix.lower(), "audio/wav")
    return f'<audio controls preload="metadata" title="{name}" src="data:{mime};base64,{data}"></audio>'


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], align_right: bool) -> str:
    sep = ["---"] + ["---:" if align_right else "---"] * (len(header) - 1)
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_grid(caption: str, rows: list[tuple[str, list[Cell]]], note: str) -> str:
    """Aligned columns in a code block; a line of ^ under the columns where something is marked bad."""
    width = max([len(c.text) for _, cells in rows for c in cells] + [1])
    label_w = max(len(name) for name, _ in rows) if rows else 0
    lines = []
    for name, cells in rows:
        lines.append(f"{name:<{label_w}}  " + " ".join(f"{c.text:>{width}}" for c in cells))
        if any(c.bad for c in cells):
            lines.append(" " * (label_w + 2) + " ".join(f"{'^' if c.bad else '':>{width}}" for c in cells))
    text = f"**{caption}**\n\n```\n" + "\n".join(line.rstrip() for line in lines) + "\n```"
    return text + (f"\n\n{note}" if note else "")


def _inline(text: str) -> str:
    """The little Markdown used in paragraphs: **bold** and `code`."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def _html_table(header: list[str], rows: list[list], out_dir: Path | None = None) -> str:
    def td(i: int, c) -> str:
        if isinstance(c, Audio):
            return f"<td class=l>{_html_audio(c, out_dir)}</td>"
        return f'<td{" class=l" if i == 0 else ""}>{_inline(c)}</td>'

    head = "".join(f'<th{" class=l" if i == 0 else ""}>{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_grid(caption: str, rows: list[tuple[str, list[Cell]]], note: str) -> str:
    trs = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(
        f'<td{" class=bad" if c.bad else ""}>{html.escape(c.text)}</td>' for c in cells) + "</tr>"
        for name, cells in rows)
    note_html = f'<div class="note">{_inline(note)}</div>' if note else ""
    return f'<div class="cap">{_inline(caption)}</div><table class="grid">{trs}</table>{note_html}'
