"""A plain roofline PNG without matplotlib (standard library only), for GPU boxes that lack it.

Same geometry as ``llmrun.profiler.plot``: log-log axes with a grid line per decade, the bandwidth
roof (black slope), the compute roof (grey flat line), a dotted ridge line, and one marker per op
per run: circles for prefill, triangles for decode, in the colour of the op's family
(``plot.FAMILIES``), the marker's area proportional to the op's share of its phase's time. There is
no text; the JSON report holds the numbers and ``plot`` draws the labelled chart where matplotlib
exists.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from llmrun.profiler.plot import FAMILIES, family

WIDTH, HEIGHT, MARGIN = 900, 600, 40
WHITE, GRID, BLACK, GREY = (255, 255, 255), (225, 225, 225), (0, 0, 0), (120, 120, 120)
MAX_RADIUS = 22  # pixels: the marker of an op taking its whole phase


class Canvas:
    """An RGB raster with lines, dots and triangles in pixel coordinates (origin top-left)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * width * height)

    def dot(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, width: int = 1, dash: int = 0) -> None:
        steps = max(int(max(abs(x1 - x0), abs(y1 - y0))), 1)
        for s in range(steps + 1):
            if dash and (s // dash) % 2:
                continue
            x, y = x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps
            for dx in range(-(width // 2), width - width // 2):
                for dy in range(-(width // 2), width - width // 2):
                    self.dot(round(x) + dx, round(y) + dy, colour)

    def marker(self, x: float, y: float, colour, triangle: bool, r: int = 5) -> None:
        for dy in range(-r, r + 1):
            half = (dy + r) / 2 if triangle else math.sqrt(max(r * r - dy * dy, 0))
            for dx in range(-round(half), round(half) + 1):
                self.dot(round(x) + dx, round(y) + dy, colour)

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def draw_png(report: dict, path: Path) -> Path:
    """Write the plain chart of ``report`` to ``path``; returns ``path``."""
    peak_f, peak_b = report["roofs"]["peak_flops"], report["roofs"]["peak_bytes_per_s"]
    ridge = peak_f / peak_b
    points = [
        (run["phase"], row["intensity"], row["achieved_flops_per_s"], row)
        for run in report["runs"]
        for row in run["ops"]
        if row["flops"] > 0 and row["bytes"] > 0 and row["time_s"] > 0
    ]
    xs = [x for _, x, _, _ in points] + [ridge]
    ys = [y for _, _, y, _ in points] + [peak_f]
    x_lo, x_hi = math.floor(math.log10(min(xs) / 2)), math.ceil(math.log10(max(xs) * 2))
    y_lo, y_hi = math.floor(math.log10(min(min(ys), min(xs) * peak_b) / 2)), math.ceil(math.log10(peak_f * 2))

    def px(x: float) -> float:
        return MARGIN + (math.log10(x) - x_lo) / (x_hi - x_lo) * (WIDTH - 2 * MARGIN)

    def py(y: float) -> float:
        return HEIGHT - MARGIN - (math.log10(y) - y_lo) / (y_hi - y_lo) * (HEIGHT - 2 * MARGIN)

    canvas = Canvas(WIDTH, HEIGHT)
    for d in range(x_lo, x_hi + 1):
        canvas.line(px(10**d), MARGIN, px(10**d), HEIGHT - MARGIN, GRID)
    for d in range(y_lo, y_hi + 1):
        canvas.line(MARGIN, py(10**d), WIDTH - MARGIN, py(10**d), GRID)
    canvas.line(MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN, BLACK)
    canvas.line(MARGIN, MARGIN, MARGIN, HEIGHT - MARGIN, BLACK)
    x_start = max(10**x_lo, 10**y_lo / peak_b)
    canvas.line(px(x_start), py(x_start * peak_b), px(ridge), py(peak_f), BLACK, width=3)
    canvas.line(px(ridge), py(peak_f), px(10**x_hi), py(peak_f), GREY, width=3)
    canvas.line(px(ridge), py(peak_f), px(ridge), HEIGHT - MARGIN, GREY, dash=4)
    for phase, x, y, row in sorted(points, key=lambda p: -p[3]["share"]):  # small markers drawn over large ones
        colour = _rgb(FAMILIES[family(row["op"])][0])
        canvas.marker(px(x), py(y), colour, triangle=phase == "decode", r=marker_radius(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


def marker_radius(row: dict) -> int:
    """Pixel radius of an op row's marker: its area proportional to the op's share (at least 1 pixel)."""
    return max(1, round(MAX_RADIUS * math.sqrt(max(row["share"], 0.0))))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
