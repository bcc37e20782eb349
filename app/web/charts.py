"""Small charts for the console, as inline SVG made on the server (no script, nothing to download).

Only numbers go into the SVG, so there is nothing to escape; the result is marked safe for Jinja.
"""
from __future__ import annotations

from markupsafe import Markup


def bars(good: list[int], bad: list[int], width: int = 240, height: int = 40) -> Markup:
    """Stacked bars, one per slot (an hour): `good` (delivered) below, `bad` (dead) on top, scaled to the tallest."""
    slots = max(len(good), 1)
    top = max((g + b for g, b in zip(good, bad)), default=0) or 1
    step = width / slots
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="delivered and dead per hour, last {slots} hours">',
             f'<rect class="chart-bg" x="0" y="0" width="{width}" height="{height}"/>']
    for i, (g, b) in enumerate(zip(good, bad)):
        x = round(i * step + 1, 1)
        w = round(max(step - 2, 1), 1)
        hg = round(g / top * (height - 2), 1)
        hb = round(b / top * (height - 2), 1)
        if g:
            parts.append(f'<rect class="bar-ok" x="{x}" y="{round(height - hg, 1)}" width="{w}" height="{hg}">'
                         f'<title>{g} delivered</title></rect>')
        if b:
            parts.append(f'<rect class="bar-dead" x="{x}" y="{round(height - hg - hb, 1)}" width="{w}" '
                         f'height="{hb}"><title>{b} dead</title></rect>')
    parts.append("</svg>")
    return Markup("".join(parts))  # nosec B704: built from integers only, nothing from a request or the store's text


__all__ = ["bars"]
