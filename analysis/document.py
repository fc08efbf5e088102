"""A small document model rendered twice: Markdown for terminals and pull requests, one self-contained HTML file
for browsers. Reports and diffs are built once as blocks, so the two formats never disagree.

Each block type is a dataclass that renders itself (``markdown``, ``html``); ``Doc`` collects them, and a
``Details`` block (folded in HTML) holds blocks of its own.
"""

from __future__ import annotations

import base64
import html
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


@dataclass
class Cell:
    """One cell of an aligned grid; ``bad`` marks a wrong prediction. ``label``, when given, is what the cell should
    have held: shown under a marked cell in HTML and after a slash in Markdown."""

    text: str
    bad: bool = False
    label: str | None = None


@dataclass
class Audio:
    """A sound file in a table cell: in HTML a player, the file inlined as a base64 data URI when ``inline``
    (else a link to it); in Markdown a relative link. ``path`` None: the file was recorded but is not here.
    """

    name: str
    path: Path | None
    inline: bool = True


@dataclass
class Picture:
    """A PNG in a table cell (a mel spectrogram beside its players): inlined in HTML, a relative link in Markdown."""

    path: Path
    alt: str


_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}


# ---------------------------------------------------------------- block types


@dataclass
class Heading:
    text: str
    level: int = 2

    def markdown(self, out_dir: Path) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self, out_dir: Path | None) -> str:
        level = min(self.level, 6)
        return f"<h{level}>{html.escape(self.text)}</h{level}>"


@dataclass
class Para:
    text: str

    def markdown(self, out_dir: Path) -> str:
        return self.text

    def html(self, out_dir: Path | None) -> str:
        return f"<p>{_inline(self.text)}</p>"


@dataclass
class Bullets:
    items: list[str]

    def markdown(self, out_dir: Path) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self, out_dir: Path | None) -> str:
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in self.items) + "</ul>"


@dataclass
class Table:
    header: list[str]
    rows: list[list]  # str, Audio or Picture cells
    align_right: bool = True

    def markdown(self, out_dir: Path) -> str:
        # Text cells are escaped: config values and manifest strings must not become HTML where markdown renders.
        rows = [[_md_audio(c, out_dir) if isinstance(c, Audio) else
                 f"[{c.alt}]({_link(c.path, out_dir)})" if isinstance(c, Picture) else html.escape(c, quote=False)
                 for c in r] for r in self.rows]
        return _md_table([html.escape(h, quote=False) for h in self.header], rows, self.align_right)

    def html(self, out_dir: Path | None) -> str:
        return _html_table(self.header, self.rows, out_dir, self.align_right)


@dataclass
class Code:
    text: str

    def markdown(self, out_dir: Path) -> str:
        return f"```\n{self.text}\n```"

    def html(self, out_dir: Path | None) -> str:
        return f"<pre>{html.escape(self.text)}</pre>"


@dataclass
class Image:
    path: Path
    alt: str

    def markdown(self, out_dir: Path) -> str:
        return f"![{self.alt}]({_relative(self.path, out_dir)})"

    def html(self, out_dir: Path | None) -> str:
        return _html_img(self.path, self.alt)


@dataclass
class Grid:
    """Rows of equally many cells shown as aligned columns; bad cells are marked in both formats."""

    caption: str
    rows: list[tuple[str, list[Cell]]]
    note: str = ""

    def markdown(self, out_dir: Path) -> str:
        return _md_grid(self.caption, self.rows, self.note)

    def html(self, out_dir: Path | None) -> str:
        return _html_grid(self.caption, self.rows, self.note)


@dataclass
class Details:
    """A folded section: ``<details>`` in HTML (``open`` unfolds it), a bold line and its blocks in Markdown."""

    summary: str
    open: bool = False
    blocks: list = field(default_factory=list)

    def markdown(self, out_dir: Path) -> str:
        return "\n\n".join([f"**{self.summary}**", *(b.markdown(out_dir) for b in self.blocks)])

    def html(self, out_dir: Path | None) -> str:
        inner = "\n".join(b.html(out_dir) for b in self.blocks)
        return (f"<details{' open' if self.open else ''}><summary>{_inline(self.summary)}</summary>\n{inner}\n"
                "</details>")


Block = Heading | Para | Bullets | Table | Code | Image | Grid | Details


@dataclass
class Doc:
    title: str
    blocks: list[Block] = field(default_factory=list)
    _target: list | None = field(default=None, repr=False)

    def add(self, block: Block) -> None:
        (self._target if self._target is not None else self.blocks).append(block)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(Heading(text, level))

    def para(self, text: str) -> None:
        self.add(Para(text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.add(Bullets(list(items)))

    def table(self, header: list[str], rows: list[list], align_right: bool = True) -> None:
        self.add(Table([str(h) for h in header], [[_cell(v) for v in r] for r in rows], align_right))

    def code(self, text: str) -> None:
        self.add(Code(text))

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None:
            self.add(Image(Path(path), alt))

    def grid(self, caption: str, rows: list[tuple[str, list[Cell]]], note: str = "") -> None:
        self.add(Grid(caption, rows, note))

    @contextmanager
    def details(self, summary: str, open: bool = False):
        """Blocks added inside ``with doc.details(...)`` go into one folded section."""
        section = Details(summary, open)
        self.add(section)
        outer, self._target = self._target, section.blocks
        try:
            yield section
        finally:
            self._target = outer

    def markdown(self, out_dir: Path) -> str:
        return "\n\n".join([f"# {self.title}", *(b.markdown(out_dir) for b in self.blocks)]) + "\n"

    def html(self, out_dir: Path | None = None) -> str:
        """The page; ``out_dir`` (where it is written) makes links to files that are not inlined relative."""
        body = [f"<h1>{html.escape(self.title)}</h1>", *(b.html(out_dir) for b in self.blocks)]
        return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
img{max-width:100%;display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}
table.grid td{font-family:ui-monospace,monospace;font-size:12px;padding:1px 4px}table.grid td.bad{background:#fbd0d0}
table.grid th{text-align:left;font-weight:500}.cap{font-weight:600;margin-top:1em}.note{color:#666}
table.grid td .lab{display:block;color:#777;font-size:10px;line-height:1.1}
audio{height:32px;width:250px;vertical-align:middle}.missing{color:#b00}
td img.mel{width:640px;max-width:none;margin:.2em 0}
details{border:1px solid #ddd;border-radius:4px;padding:.2em .8em;margin:.5em 0}
summary{cursor:pointer;font-weight:600;padding:.2em 0}
"""


def _cell(value) -> str | Audio | Picture:
    if isinstance(value, (Audio, Picture)):
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


def _html_img(path: Path, alt: str, css_class: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


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


def _md_text(cell: Cell) -> str:
    return f"{cell.text}/{cell.label}" if cell.bad and cell.label is not None else cell.text


def _md_grid(caption: str, rows: list[tuple[str, list[Cell]]], note: str) -> str:
    """Aligned columns in a code block; a line of ^ under the columns where something is marked bad."""
    width = max([len(_md_text(c)) for _, cells in rows for c in cells] + [1])
    label_w = max(len(name) for name, _ in rows) if rows else 0
    lines = []
    for name, cells in rows:
        lines.append(f"{name:<{label_w}}  " + " ".join(f"{_md_text(c):>{width}}" for c in cells))
        if any(c.bad and c.label is None for c in cells):  # a cell with its label shows the slash instead
            lines.append(" " * (label_w + 2) + " ".join(f"{'^' if c.bad and c.label is None else '':>{width}}"
                                                      for c in cells))
    text = (f"**{caption}**\n\n" if caption else "") + "```\n" + "\n".join(line.rstrip() for line in lines) + "\n```"
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


def _html_table(header: list[str], rows: list[list], out_dir: Path | None = None, align_right: bool = True) -> str:
    def td(i: int, c) -> str:
        if isinstance(c, Audio):
            return f"<td class=l>{_html_audio(c, out_dir)}</td>"
        if isinstance(c, Picture):
            return f"<td class=l>{_html_img(c.path, c.alt, 'mel')}</td>"
        return f'<td{" class=l" if i == 0 or not align_right else ""}>{_inline(c)}</td>'

    head = "".join(f'<th{" class=l" if i == 0 or not align_right else ""}>{html.escape(h)}</th>'
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_cell(c: Cell) -> str:
    label = f'<span class="lab">{html.escape(c.label)}</span>' if c.bad and c.label is not None else ""
    return f'<td{" class=bad" if c.bad else ""}>{html.escape(c.text)}{label}</td>'


def _html_grid(caption: str, rows: list[tuple[str, list[Cell]]], note: str) -> str:
    trs = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(_html_cell(c) for c in cells) + "</tr>"
                  for name, cells in rows)
    note_html = f'<div class="note">{_inline(note)}</div>' if note else ""
    cap = f'<div class="cap">{_inline(caption)}</div>' if caption else ""
    return f'{cap}<table class="grid">{trs}</table>{note_html}'
