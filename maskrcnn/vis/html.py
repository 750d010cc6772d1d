"""A few helpers to write one self-contained HTML page: escaped text, tables, pictures by relative link.

    page("title", [h2("Section"), table(["a", "b"], [[1, 2]]), picture("img/x.png", "x")])
"""
from __future__ import annotations

import html
from typing import Iterable, Optional, Sequence

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 16px 24px; color: #222;
       font-size: 14px; line-height: 1.4; }
h1 { font-size: 22px; margin: 4px 0 8px; } h2 { font-size: 18px; margin: 24px 0 6px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 14px 0 4px; }
table { border-collapse: collapse; margin: 6px 0 10px; } th, td { border: 1px solid #ccc; padding: 2px 7px; }
th { background: #f2f2f2; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { background: #b6ecb6; color: #075407; font-weight: 600; } td.worse { background: #f5b8b8; color: #870909; font-weight: 600; }
.pair { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; } .pair > div { flex: 1 1 500px; min-width: 0; overflow-x: auto; }
.views td { vertical-align: top; text-align: center; } .views img { max-width: 138px; max-height: 138px; } .views td { padding: 2px 3px; }
img.figure { max-width: 100%; } code, pre { background: #f4f4f4; padding: 1px 4px; font-size: 13px; }
pre { padding: 6px 8px; white-space: pre-wrap; word-break: break-all; } .note { color: #555; font-size: 13px; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: object, digits: int = 3) -> str:
    """Numbers for tables: floats with `digits` decimals, ints as they are, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], classes: Optional[Iterable[Sequence[str]]] = None,
          css: str = "") -> str:
    """A table; cells are formatted with fmt (a str is taken as HTML already escaped by the caller only when it
    starts with '<', otherwise escaped). `classes`: a CSS class per cell (e.g. better / worse)."""
    rows = [list(r) for r in rows]
    classes = [list(c) for c in classes] if classes is not None else [[""] * len(r) for r in rows]
    out = [f'<table class="{esc(css)}">' if css else "<table>",
           "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row, cls in zip(rows, classes):
        cells = []
        for value, c in zip(row, cls):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = value if isinstance(value, str) and value.startswith("<") else esc(fmt(value))
            names = " ".join(n for n in (("num" if numeric else ""), c) if n)
            cells.append(f'<td class="{names}">{text}</td>' if names else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def picture(src: str, alt: str, css: str = "", link: bool = True) -> str:
    """An image by relative path, linked to itself (click for full size)."""
    img = f'<img src="{esc(src)}" alt="{esc(alt)}" title="{esc(alt)}" loading="lazy"' + \
          (f' class="{esc(css)}"' if css else "") + ">"
    return f'<a href="{esc(src)}">{img}</a>' if link else img


def h2(text: str, anchor: str = "") -> str:
    return f'<h2 id="{esc(anchor)}">{esc(text)}</h2>' if anchor else f"<h2>{esc(text)}</h2>"


def h3(text: str) -> str:
    return f"<h3>{esc(text)}</h3>"


def para(text: str, css: str = "") -> str:
    return f'<p class="{esc(css)}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def code_block(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def pair(columns: Sequence[str]) -> str:
    """Blocks side by side (one per checkpoint); a single block as it is."""
    if len(columns) == 1:
        return columns[0]
    return '<div class="pair">' + "".join(f"<div>{c}</div>" for c in columns) + "</div>"


def page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
