"""Small charts for the admin, drawn on the server as inline SVG: no JavaScript, no external
assets, readable in any browser (and by a screen reader, through their titles)."""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe


def _svg(css_class: str, label: str, width: int, height: int, body: SafeString) -> SafeString:
    """The chart's frame: its size, and ``label`` as its title and accessible name."""
    return format_html(
        '<svg class="{}" role="img" aria-label="{}" width="{}" height="{}" viewBox="0 0 {} {}">'
        "<title>{}</title>{}</svg>",
        css_class,
        label,
        width,
        height,
        width,
        height,
        label,
        body,
    )


def sparkline_svg(values: Sequence[float], *, label: str, width: int = 120, height: int = 24) -> SafeString:
    """One bar per value, scaled to the largest; ``label`` is the chart's title (hover text)."""
    top = max(values, default=0) or 1
    step = width / max(len(values), 1)
    bars = format_html_join(
        "",
        '<rect x="{}" y="{}" width="{}" height="{}"></rect>',
        (
            (
                f"{i * step:.1f}",
                f"{height - v / top * height:.1f}",
                f"{max(step - 0.5, 0.5):.1f}",
                f"{v / top * height:.1f}",
            )
            for i, v in enumerate(values)
            if v > 0
        ),
    )
    axis = format_html(
        '<line x1="0" y1="{}" x2="{}" y2="{}" class="mlx-axis"></line>{}',
        height - 0.5,
        width,
        height - 0.5,
        bars,
    )
    return _svg("mlx-spark", label, width, height, axis)


def latency_chart_svg(
    values_ms: Sequence[float], *, label: str, width: int = 640, height: int = 160
) -> SafeString:
    """Inter-token latency over a generation: one point per token (x: the token's place, y:
    milliseconds since the one before), the largest marked, axes labelled."""
    if not values_ms:
        return mark_safe("<p>No inter-token latency: fewer than two tokens.</p>")
    left, bottom, top_pad = 64, 22, 8
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    top = max(values_ms) or 1.0
    n = len(values_ms)

    def x(i: int) -> float:
        return left + (i / max(n - 1, 1)) * plot_w

    def y(v: float) -> float:
        return top_pad + plot_h - v / top * plot_h

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values_ms))
    worst = max(range(n), key=lambda i: values_ms[i])
    body = format_html(
        '<line x1="{}" y1="{}" x2="{}" y2="{}" class="mlx-axis"></line>'
        '<line x1="{}" y1="{}" x2="{}" y2="{}" class="mlx-axis"></line>'
        '<text x="{}" y="{}" class="mlx-tick" text-anchor="end">{} ms</text>'
        '<text x="{}" y="{}" class="mlx-tick" text-anchor="end">0</text>'
        '<text x="{}" y="{}" class="mlx-tick">token 2</text>'
        '<text x="{}" y="{}" class="mlx-tick" text-anchor="end">token {}</text>'
        '<polyline points="{}" class="mlx-line"></polyline>'
        '<circle cx="{}" cy="{}" r="3" class="mlx-worst">'
        "<title>slowest: token {}, {} ms</title></circle>",
        left,
        top_pad,
        left,
        top_pad + plot_h,
        left,
        top_pad + plot_h,
        width - 8,
        top_pad + plot_h,
        left - 4,
        top_pad + 10,
        f"{top:.1f}",
        left - 4,
        top_pad + plot_h,
        left,
        height - 4,
        width - 8,
        height - 4,
        n + 1,
        points,
        f"{x(worst):.1f}",
        f"{y(values_ms[worst]):.1f}",
        worst + 2,
        f"{values_ms[worst]:.1f}",
    )
    return _svg("mlx-latency", label, width, height, body)
