"""Small charts for the console, drawn as inline SVG by the templates (templates/console/_chart.html) from the
geometry computed here: no script, nothing to download, and Jinja escapes whatever it prints.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    y: float
    height: float
    kind: str  # "ok" (delivered) | "dead"
    count: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    slots: int
    bars: list[Bar]


def bars(good: list[int], bad: list[int], width: int = 240, height: int = 40) -> Chart:
    """Stacked bars, one per slot (an hour): `good` (delivered) below, `bad` (dead) on top, scaled to the tallest."""
    slots = max(len(good), 1)
    top = max((g + b for g, b in zip(good, bad)), default=0) or 1
    step = width / slots
    drawn = []
    for i, (g, b) in enumerate(zip(good, bad)):
        x, w = round(i * step + 1, 1), round(max(step - 2, 1), 1)
        hg, hb = round(g / top * (height - 2), 1), round(b / top * (height - 2), 1)
        if g:
            drawn.append(Bar(x, w, round(height - hg, 1), hg, "ok", g))
        if b:
            drawn.append(Bar(x, w, round(height - hg - hb, 1), hb, "dead", b))
    return Chart(width, height, slots, drawn)


__all__ = ["Bar", "Chart", "bars"]
