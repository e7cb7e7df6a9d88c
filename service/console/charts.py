"""Inline SVG charts for the console, drawn on the server with no script and no library, so pages
work offline and every number sits in the DOM for tests and screen readers.

Every data mark has ``class="mark"``, ``data-label`` and ``data-value`` (six fixed decimals, or
empty when the value is missing), the chart's other coordinates as ``data-*`` attributes, and a
``<title>`` tooltip with the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from html import escape

from service.errors import InvalidInput

__all__ = ["bar_chart", "heatmap", "interval_chart", "line_chart"]

WIDTH = 640  # every viewBox is this wide; the height grows with the rows drawn
PLOT_HEIGHT = 220  # plot area of the line chart
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")  # Okabe–Ito
BLUES = ((247, 251, 255), (107, 174, 214), (8, 48, 107))  # heatmap scale, light to dark
GRID, INK, MISSING = "#e6e6e6", "#333333", "#eeeeee"
CHAR_W = 6.2  # mean width of an 11px character, to size label margins
LABEL_CHARS = 32  # longer labels are clipped on screen; data-label and the tooltip keep them whole


def _clean(value: float | None) -> float | None:
    """Treat None, NaN and infinities alike, so one branch draws every gap."""
    return float(value) if value is not None and math.isfinite(value) else None


def _data(value: float | None) -> str:
    """A number as data-* attributes carry it: six fixed decimals, empty when missing."""
    return "" if value is None else format(value, ".6f")


def _show(value: float | None, percent: bool = False) -> str:
    """A number as people read it: a one-decimal percent, an integer, or at most three decimals."""
    if value is None:
        return "n/a"
    if percent:
        return f"{value * 100:.1f}%"
    if value.is_integer():
        return str(int(value))
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if float(text) else f"{value:.3g}"


def _exact(value: float | None, percent: bool = False) -> str:
    """A number in full, for tooltips."""
    if value is None:
        return "n/a"
    return f"{round(value * 100, 6)!r}%" if percent else repr(value)


def _clip(text: object, limit: int = LABEL_CHARS) -> str:
    """Shorten a label for the screen, marking the cut with an ellipsis."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _attrs(**attrs: object) -> str:
    """Keyword arguments as escaped XML attributes (``class_`` → class, ``data_x`` → data-x); None is left out."""
    return "".join(
        f' {key.rstrip("_").replace("_", "-")}="{escape(str(round(value, 6) if isinstance(value, float) else value))}"'
        for key, value in attrs.items() if value is not None)


def _tag(tag: str, tip: str = "", **attrs: object) -> str:
    """One SVG shape, with a ``<title>`` tooltip when `tip` is given."""
    inner = f"<title>{escape(tip)}</title>" if tip else ""
    return f"<{tag}{_attrs(**attrs)}>{inner}</{tag}>"


def _text(x: float, y: float, text: str, **attrs: object) -> str:
    """A text element, escaped, in the chart's ink unless told otherwise."""
    return f"<text{_attrs(x=x, y=y, fill=attrs.pop('fill', INK), **attrs)}>{escape(text)}</text>"


def _svg(kind: str, title: str, height: float, parts: list[str]) -> str:
    """Wrap drawn parts in the responsive root element that every chart shares."""
    root = _attrs(xmlns="http://www.w3.org/2000/svg", class_=f"chart chart-{kind}", data_chart=kind,
                  viewBox=f"0 0 {WIDTH} {math.ceil(height)}", width="100%", role="img", aria_label=title,
                  font_family="inherit", font_size=11)
    return f"<svg{root}>{_text(8, 16, title, font_size=12, font_weight='bold')}{''.join(parts)}</svg>"


def _no_data(kind: str, title: str) -> str:
    """The small chart shown instead of empty axes."""
    return _svg(kind, title, 60, [_text(WIDTH / 2, 42, "no data", text_anchor="middle", fill="#777777")])


def _colour(index: int) -> str:
    """The palette colour of a series, cycling when there are more series than colours."""
    return PALETTE[index % len(PALETTE)]


def _blue(share: float) -> str:
    """The blue of a share in [0, 1]: each channel falls as the share grows, so darker means larger."""
    t = min(max(share, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(t), len(BLUES) - 2)
    return "#" + "".join(f"{round(a + (t - i) * (b - a)):02x}" for a, b in zip(BLUES[i], BLUES[i + 1]))


def _axis(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Widen [lo, hi] to round bounds and return them with about five evenly spaced ticks."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / 4
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    lo = round(math.floor(lo / step + 1e-9) * step, 12)
    hi = round(math.ceil(hi / step - 1e-9) * step, 12)
    return lo, hi, [round(lo + i * step, 12) for i in range(round((hi - lo) / step) + 1)]


def _scale(value: float, lo: float, hi: float, start: float, end: float) -> float:
    """Map a value from [lo, hi] onto [start, end], clamped so marks stay inside the plot."""
    return start + min(max((value - lo) / (hi - lo), 0.0), 1.0) * (end - start)


def _label_width(labels: Iterable[object]) -> float:
    """A left margin wide enough for the longest label as shown."""
    return 12 + CHAR_W * max([6, *(len(_clip(label)) for label in labels)])


def _upright(text: str, top: float, bottom: float) -> str:
    """An axis title turned to run up the left edge beside the plot."""
    middle = (top + bottom) / 2
    return _text(14, middle, text, text_anchor="middle", transform=f"rotate(-90 14 {middle})")


def _axis_parts(domain: tuple[float, float, list[float]], box: tuple[float, float, float, float], percent: bool,
                title: str, *, across: bool) -> list[str]:
    """Gridlines at the ticks with their labels and the axis title: below the plot for x (`across`), left for y."""
    (lo, hi, ticks), (left, right, top, bottom) = domain, box
    parts = []
    for t in ticks:
        label = f"{t * 100:g}%" if percent else _show(t)
        if across:
            x = _scale(t, lo, hi, left, right)
            parts += [_tag("line", x1=x, x2=x, y1=top, y2=bottom, stroke=GRID),
                      _text(x, bottom + 14, label, text_anchor="middle")]
        else:
            y = _scale(t, lo, hi, bottom, top)
            parts += [_tag("line", x1=left, x2=right, y1=y, y2=y, stroke=GRID),
                      _text(left - 6, y + 4, label, text_anchor="end")]
    if not across:
        return parts + [_upright(title, top, bottom)]
    return parts + [_text((left + right) / 2, bottom + 32, title, text_anchor="middle")]


def _legend(names: list[str], y: float = 34) -> tuple[list[str], float]:
    """Colour swatches with series names, wrapped into rows; returns the parts and the y below them."""
    parts, x = [], 8.0
    for k, name in enumerate(names):
        text = _clip(name, 24)
        step = 26 + CHAR_W * len(text)
        if x > 8 and x + step > WIDTH:
            x, y = 8.0, y + 16
        parts += [_tag("rect", x=x, y=y - 9, width=10, height=10, fill=_colour(k)), _text(x + 14, y, text)]
        x += step
    return parts, y + 14


def bar_chart(items: list[tuple[str, float | None]], *, title: str, value_label: str = "", percent: bool = False,
              max_value: float | None = None) -> str:
    """Horizontal bars, one row per item, so long label lists stay readable."""
    if not items:
        return _no_data("bar", title)
    values = [_clean(value) for _, value in items]
    known = [v for v in values if v is not None]
    top_value = max_value if max_value is not None else max([1.0 if percent else 0.0, *known])
    domain = _axis(min([0.0, *known]), top_value)
    left, right, top, row = _label_width(label for label, _ in items), WIDTH - 64, 30, 22
    bottom = top + row * len(items)
    parts = _axis_parts(domain, (left, right, top, bottom), percent, value_label, across=True)
    zero = _scale(0.0, domain[0], domain[1], left, right)
    for i, ((label, _), value) in enumerate(zip(items, values)):
        y = top + i * row
        end = zero if value is None else _scale(value, domain[0], domain[1], left, right)
        parts += [_text(left - 6, y + row / 2 + 4, _clip(label), text_anchor="end"),
                  _tag("rect", f"{label}: {_exact(value, percent)}", class_="mark", x=min(zero, end), y=y + 3,
                       width=abs(end - zero), height=row - 6, fill=PALETTE[0], data_label=label,
                       data_value=_data(value)),
                  _text(max(zero, end) + 4, y + row / 2 + 4, _show(value, percent))]
    return _svg("bar", title, bottom + 44, parts)


def _check_grid(name: str, grid: list[list], rows: list[str], cols: list[str]) -> None:
    """Reject a matrix whose shape differs from its labels, naming the first bad row."""
    if len(grid) != len(rows):
        raise InvalidInput(f"{name}: {len(grid)} rows for {len(rows)} row labels {list(rows)}")
    for i, line in enumerate(grid):
        if len(line) != len(cols):
            raise InvalidInput(f"{name}[{i}]: {len(line)} cells for {len(cols)} column labels {list(cols)}")


def heatmap(rows: list[str], cols: list[str], values: list[list[float | None]], *, title: str, row_title: str,
            col_title: str, counts: list[list[int]] | None = None) -> str:
    """Confusion matrix, gold labels as rows, shaded by row share so rare labels read as clearly as common ones."""
    if not rows or not cols:
        return _no_data("heatmap", title)
    _check_grid("values", values, rows, cols)
    if counts is not None:
        _check_grid("counts", counts, rows, cols)
    left = 24 + _label_width(rows)
    cell_w, cell_h, top = min(64.0, (WIDTH - left - 8) / len(cols)), 26, 30
    widest = CHAR_W * max(len(_clip(col, 20)) for col in cols)
    turned = widest > cell_w - 4  # column labels that do not fit are written at 45 degrees
    bottom = top + cell_h * len(rows)
    parts = [_upright(row_title, top, bottom)]
    for j, col in enumerate(cols):
        x = left + (j + 0.5) * cell_w
        place = {"text_anchor": "end", "transform": f"rotate(-45 {x} {bottom + 14})"} if turned else {
            "text_anchor": "middle"}
        parts.append(_text(x, bottom + 14, _clip(col, 20), **place))
    for i, (row, line) in enumerate(zip(rows, values)):
        parts.append(_text(left - 6, top + (i + 0.5) * cell_h + 4, _clip(row), text_anchor="end"))
        cells = [_clean(v) for v in line]
        total = sum(v for v in cells if v is not None)
        for j, (col, value) in enumerate(zip(cols, cells)):
            share = value / total if value is not None and total > 0 else 0.0
            count = None if counts is None else counts[i][j]
            tip = (f"gold {row}, predicted {col}: {_exact(value)}" + ("" if count is None else f" (n={count})")
                   + f", {share:.1%} of row")
            x, y = left + j * cell_w, top + i * cell_h
            parts += [_tag("rect", tip, class_="mark", x=x, y=y, width=cell_w - 1, height=cell_h - 1,
                           fill=MISSING if value is None else _blue(share), data_label=f"{row} → {col}",
                           data_row=row, data_col=col, data_value=_data(value), data_share=_data(share),
                           data_count=count),
                      _text(x + cell_w / 2, y + cell_h / 2 + 4, _show(None if value is None else round(value, 1)),
                            text_anchor="middle", fill="#ffffff" if share > 0.55 else INK)]
    under = bottom + 20 + (widest * 0.71 if turned else 0)
    return _svg("heatmap", title, under + 24, parts + [_text(left + cell_w * len(cols) / 2, under + 12, col_title,
                                                             text_anchor="middle")])


def _line_series(series: dict, colour: str, px: Callable[[float], float], py: Callable[[float], float],
                 percent: bool) -> list[str]:
    """One series: a polyline per run of known points, and a circle mark for every point."""
    name, points, sizes = series["name"], series.get("points") or [], series.get("sizes")
    if sizes is not None and len(sizes) != len(points):
        raise InvalidInput(f"series {name!r}: {len(sizes)} sizes for {len(points)} points")
    largest = max([1, *(sizes or [])])
    runs: list[list[str]] = [[]]
    marks: list[str] = []
    for i, point in enumerate(points):
        x, y = (_clean(v) for v in point)
        size = None if sizes is None else sizes[i]
        cx, cy = (px(x), py(y)) if x is not None and y is not None else (None, None)
        known = cx is not None
        if known:
            runs[-1].append(f"{cx:.3f},{cy:.3f}")
        elif runs[-1]:
            runs.append([])
        radius = 3.5 if size is None else 2.5 + 4.5 * math.sqrt(max(size, 0) / largest)
        tip = f"{name}: {_exact(x, percent)} → {_exact(y, percent)}" + ("" if size is None else f" (n={size})")
        marks.append(_tag("circle", tip, class_="mark", cx=cx, cy=cy,
                          r=radius if known else 0, fill=colour, data_series=name, data_label=_show(x, percent),
                          data_x=_data(x), data_y=_data(y), data_value=_data(y), data_size=size))
    lines = [_tag("polyline", name, points=" ".join(run), fill="none", stroke=colour, stroke_width=2)
             for run in runs if len(run) > 1]
    return lines + marks


def line_chart(series: list[dict], *, title: str, x_title: str, y_title: str, x_range: tuple[float, float] = (0, 1),
               y_range: tuple[float, float] = (0, 1), diagonal: bool = False, percent_axes: bool = True) -> str:
    """Points joined per series; with `diagonal`, a reliability diagram read against perfect calibration."""
    if not any(s.get("points") for s in series):
        return _no_data("line", title)
    x_domain, y_domain = _axis(*x_range), _axis(*y_range)
    legend, top = _legend([s["name"] for s in series]) if len(series) > 1 else ([], 30)
    left, right, bottom = 56, WIDTH - 16, top + PLOT_HEIGHT

    def px(x: float) -> float:
        return _scale(x, x_domain[0], x_domain[1], left, right)

    def py(y: float) -> float:
        return _scale(y, y_domain[0], y_domain[1], bottom, top)

    box = (left, right, top, bottom)
    parts = (legend + _axis_parts(x_domain, box, percent_axes, x_title, across=True)
             + _axis_parts(y_domain, box, percent_axes, y_title, across=False))
    if diagonal:
        a, b = max(x_domain[0], y_domain[0]), min(x_domain[1], y_domain[1])
        parts.append(_tag("line", "perfect calibration", x1=px(a), y1=py(a), x2=px(b), y2=py(b), stroke="#888888",
                          stroke_dasharray="4 3"))
    for k, one in enumerate(series):
        parts += _line_series(one, _colour(k), px, py, percent_axes)
    return _svg("line", title, bottom + 44, parts)


def _whisker(label: str, estimate: dict, y: float, colour: str, px: Callable[[float], float],
             percent: bool) -> list[str]:
    """One series' interval as a line from low to high, with its estimate as the dot mark."""
    value, low, high = (_clean(estimate.get(key)) for key in ("estimate", "low", "high"))
    series = estimate["series"]
    tip = f"{label}, {series}: {_exact(value, percent)} [{_exact(low, percent)}, {_exact(high, percent)}]"
    line = [] if low is None or high is None else [
        _tag("line", tip, x1=px(low), x2=px(high), y1=y, y2=y, stroke=colour, stroke_width=2)]
    return line + [_tag("circle", tip, class_="mark", cx=None if value is None else px(value), cy=y,
                        r=0 if value is None else 4, fill=colour, stroke="#ffffff", data_label=label,
                        data_series=series, data_value=_data(value), data_low=_data(low), data_high=_data(high))]


def interval_chart(rows: list[dict], *, title: str, x_title: str, percent: bool = True,
                   truth: dict[str, float] | None = None) -> str:
    """Forest plot: per label, one whisker per series from low to high, offset so series sit side by side."""
    if not rows:
        return _no_data("interval", title)
    truth = truth or {}
    names = list(dict.fromkeys(e["series"] for row in rows for e in row["estimates"]))
    known = [v for v in (_clean(e.get(key)) for row in rows for e in row["estimates"]
                         for key in ("estimate", "low", "high")) if v is not None]
    known += [v for v in map(_clean, truth.values()) if v is not None]
    # shares live in [0, 1]: an estimate a hair outside it (DSL's can be) is drawn at the edge, not widening the axis
    domain = _axis(0.0, 1.0) if percent or not known else _axis(min(known), max(known))
    legend, top = _legend(names) if len(names) > 1 else ([], 30)
    left, right, band = _label_width(row["label"] for row in rows), WIDTH - 16, 12 * len(names) + 12
    bottom = top + band * len(rows)

    def px(x: float) -> float:
        return _scale(x, domain[0], domain[1], left, right)

    parts = legend + _axis_parts(domain, (left, right, top, bottom), percent, x_title, across=True)
    for i, row in enumerate(rows):
        label, y0 = row["label"], top + i * band
        parts.append(_text(left - 6, y0 + band / 2 + 4, _clip(label), text_anchor="end"))
        for estimate in row["estimates"]:
            k = names.index(estimate["series"])
            parts += _whisker(label, estimate, y0 + 12 + 12 * k, _colour(k), px, percent)
        true = _clean(truth.get(label))
        if true is not None:
            parts.append(_tag("line", f"{label}: true value {_exact(true, percent)}", x1=px(true), x2=px(true),
                              y1=y0 + 3, y2=y0 + band - 3, stroke=INK, stroke_width=2))
    return _svg("interval", title, bottom + 44, parts)
