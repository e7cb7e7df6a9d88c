"""service.console.charts read back as XML: marks' data-* attributes against the inputs, geometry against the values,
visible text against the formatting rules; seeded inputs, no browser."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from service.console.charts import bar_chart, heatmap, interval_chart, line_chart

TRICKY = '<b>&"x"'  # must come back intact from data-label, and must not break the XML
LABELS = ["sports", "politics", TRICKY]


def _tag(element: ET.Element) -> str:
    """Tag name without the SVG namespace."""
    return element.tag.rsplit("}", 1)[-1]


def _marks(root: ET.Element) -> list[ET.Element]:
    """The data marks of a parsed chart, in document order."""
    return [el for el in root.iter() if el.get("class") == "mark"]


def _texts(root: ET.Element) -> list[str]:
    """Every visible text of a parsed chart."""
    return [el.text or "" for el in root.iter() if _tag(el) == "text"]


def _luminance(fill: str) -> float:
    """Relative brightness of a #rrggbb colour; lower is darker."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _bar(items=(("sports", 0.8734), ("politics", 0.42), (TRICKY, 0.05)), **options):
    return bar_chart(list(items), title="Accuracy <by> label", **{"percent": True, **options})


def _heatmap(values=((8, 2, 0), (1, 5, 4), (0, 0, 3)), **options):
    return heatmap(LABELS, LABELS, [list(row) for row in values], title="Confusion", row_title="gold",
                   col_title="predicted", **options)


def _line(points=((0.1, 0.2), (0.3, None), (0.5, 0.45), (0.9, 0.85)), **options):
    series = [{"name": "gemma", "points": list(points), "sizes": [5, 0, 20, 40]},
              {"name": "qwen", "points": [(0.2, 0.3), (0.8, 0.7)]}]
    return line_chart(series, title="Reliability", x_title="confidence", y_title="accuracy", **options)


ROWS = [{"label": "sports", "estimates": [{"series": "DSL", "estimate": 0.31, "low": 0.25, "high": 0.37},
                                          {"series": "naive", "estimate": 0.4, "low": None, "high": None}]},
        {"label": TRICKY, "estimates": [{"series": "DSL", "estimate": None, "low": None, "high": None}]}]


def _interval(rows=ROWS, **options):
    return interval_chart(rows, title="Shares", x_title="share", **options)


CHARTS = {"bar": _bar, "heatmap": _heatmap, "line": _line, "interval": _interval}


@pytest.mark.parametrize("kind", CHARTS)
def test_every_chart_is_a_responsive_svg_whose_marks_carry_values_and_tooltips(kind):
    root = ET.fromstring(CHARTS[kind]())
    assert root.get("class") == f"chart chart-{kind}" and root.get("data-chart") == kind
    assert root.get("role") == "img" and root.get("aria-label") and root.get("width") == "100%"
    assert root.get("viewBox").startswith("0 0 640 ")
    assert _marks(root)
    for mark in _marks(root):
        assert mark.get("data-label") is not None and mark.get("data-value") is not None
        assert [_tag(child) for child in mark] == ["title"] and mark[0].text


def test_bar_marks_carry_labels_and_six_decimal_values():
    root = ET.fromstring(_bar())
    assert [(m.get("data-label"), m.get("data-value")) for m in _marks(root)] == [
        ("sports", "0.873400"), ("politics", "0.420000"), (TRICKY, "0.050000")]
    assert root.get("aria-label") == "Accuracy <by> label"
    assert TRICKY in _texts(root)


def test_bar_widths_are_proportional_to_values():
    values = [37.0, 12.5, 3.25, 0.0]
    root = ET.fromstring(bar_chart([(f"l{i}", v) for i, v in enumerate(values)], title="Counts"))
    widths = [float(m.get("width")) for m in _marks(root)]
    assert widths[-1] == 0.0
    for width, value in zip(widths[1:3], values[1:3]):
        assert width / widths[0] == pytest.approx(value / values[0], rel=1e-6)


def test_bar_text_formats_percents_integers_and_decimals():
    assert {"87.3%", "42.0%", "5.0%"} <= set(_texts(ET.fromstring(_bar())))
    plain = ET.fromstring(bar_chart([("a", 12.0), ("b", 1.23456), ("c", 0.5)], title="n", value_label="docs"))
    assert {"12", "1.235", "0.5", "docs"} <= set(_texts(plain))


def test_bar_chart_grows_with_its_rows_and_keeps_them_inside():
    def height(n):
        svg = ET.fromstring(bar_chart([(f"label {i}", i) for i in range(n)], title="many"))
        bottom = max(float(m.get("y")) + float(m.get("height")) for m in _marks(svg))
        total = float(svg.get("viewBox").split()[3])
        assert bottom < total
        return total

    assert height(40) > height(4)


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_missing_values_draw_gaps_with_empty_data_values(missing):
    bar = ET.fromstring(_bar([("a", 0.5), ("b", missing)]))
    assert _marks(bar)[1].get("data-value") == "" and "n/a" in _texts(bar)
    cells = ET.fromstring(_heatmap([(1, missing, 1), (0, 1, 0), (0, 0, 1)]))
    assert _marks(cells)[1].get("data-value") == "" and "n/a" in _texts(cells)
    points = _marks(ET.fromstring(_line([(0.1, 0.2), (0.3, missing), (0.5, 0.4), (0.9, 0.8)])))
    assert points[1].get("data-value") == "" and points[1].get("data-y") == "" and points[1].get("r") == "0"
    dots = _marks(ET.fromstring(_interval()))
    assert (dots[1].get("data-low"), dots[1].get("data-high")) == ("", "")
    assert dots[2].get("data-value") == "" and dots[2].get("r") == "0"


def test_heatmap_cells_carry_row_col_raw_value_and_count():
    values = [(8, 2, 0), (1, 5, 4), (0, 0, 3)]
    root = ET.fromstring(_heatmap(values, counts=[list(row) for row in values]))
    got = [(m.get("data-row"), m.get("data-col"), m.get("data-value"), m.get("data-count")) for m in _marks(root)]
    assert got == [(r, c, format(values[i][j], ".6f"), str(values[i][j]))
                   for i, r in enumerate(LABELS) for j, c in enumerate(LABELS)]
    assert {"8", "5", "3", "gold", "predicted"} <= set(_texts(root))
    assert "2.5" in _texts(ET.fromstring(_heatmap([(2.46, 1, 1), (1, 1, 1), (1, 1, 1)])))


def test_heatmap_shade_darkens_with_row_share_and_ignores_row_size():
    rng = random.Random(7)
    values = [[rng.randint(0, 50) for _ in LABELS] for _ in LABELS]
    values[0], values[1] = [1, 1, 2], [10, 10, 20]  # same shares at ten times the size
    cells = _marks(ET.fromstring(_heatmap(values)))
    shares = [v / sum(row) for row in values for v in row]
    ranked = sorted(zip(shares, (_luminance(c.get("fill")) for c in cells)))
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert ranked[0][1] > ranked[-1][1]
    assert [c.get("fill") for c in cells[:3]] == [c.get("fill") for c in cells[3:6]]


def test_heatmap_writes_white_on_dark_cells_only():
    root = ET.fromstring(_heatmap([(9, 0, 0), (0, 1, 0), (0, 0, 1)]))
    fills = {el.text: el.get("fill") for el in root.iter() if _tag(el) == "text" and el.text in {"9", "0"}}
    assert fills == {"9": "#ffffff", "0": "#333333"}


def test_heatmap_rejects_values_that_do_not_match_the_labels():
    with pytest.raises(ValueError, match=r"values\[1\]: 2 cells for 3 column labels"):
        _heatmap([(1, 2, 3), (1, 2), (1, 2, 3)])


def test_line_chart_points_legend_diagonal_and_percent_axes():
    root = ET.fromstring(_line(diagonal=True))
    got = [(m.get("data-series"), m.get("data-x"), m.get("data-y"), m.get("data-size")) for m in _marks(root)]
    assert got == [("gemma", "0.100000", "0.200000", "5"), ("gemma", "0.300000", "", "0"),
                   ("gemma", "0.500000", "0.450000", "20"), ("gemma", "0.900000", "0.850000", "40"),
                   ("qwen", "0.200000", "0.300000", None), ("qwen", "0.800000", "0.700000", None)]
    runs = [len(el.get("points").split()) for el in root.iter() if _tag(el) == "polyline"]
    assert runs == [2, 2]  # gemma's line breaks at its gap, leaving one lone point and a run of two
    assert any(el.findtext("{*}title") == "perfect calibration" for el in root.iter() if _tag(el) == "line")
    texts = _texts(root)
    assert {"gemma", "qwen", "0%", "25%", "50%", "75%", "100%", "confidence", "accuracy"} <= set(texts)
    single = _texts(ET.fromstring(line_chart([{"name": "solo", "points": [(0, 0), (1, 1)]}], title="t",
                                             x_title="x", y_title="y")))
    assert "solo" not in single


def test_interval_marks_carry_estimates_bounds_and_series():
    root = ET.fromstring(_interval(truth={"sports": 0.3}))
    got = [(m.get("data-label"), m.get("data-series"), m.get("data-value"), m.get("data-low"), m.get("data-high"))
           for m in _marks(root)]
    assert got == [("sports", "DSL", "0.310000", "0.250000", "0.370000"), ("sports", "naive", "0.400000", "", ""),
                   (TRICKY, "DSL", "", "", "")]
    assert {"DSL", "naive", "share"} <= set(_texts(root))
    titles = [el.findtext("{*}title") for el in root.iter() if _tag(el) == "line"]
    assert "sports, DSL: 31.0% [25.0%, 37.0%]" in titles and "sports: true value 30.0%" in titles


@pytest.mark.parametrize("draw", [
    lambda: bar_chart([], title="t"),
    lambda: heatmap([], [], [], title="t", row_title="r", col_title="c"),
    lambda: line_chart([], title="t", x_title="x", y_title="y"),
    lambda: line_chart([{"name": "s", "points": []}], title="t", x_title="x", y_title="y"),
    lambda: interval_chart([], title="t", x_title="x"),
])
def test_empty_inputs_render_no_data(draw):
    root = ET.fromstring(draw())
    assert "no data" in _texts(root) and not _marks(root)
