"""Audit reports: one document, written as a self-contained HTML page and as JSON.

A report is a JSON-ready dict (validated against ``report.schema.json``) with red
flags first, then sections. Figures are Matplotlib PNGs embedded as data URIs, so the
page reads offline; the JSON holds the numbers the figures plot, never the images.
No report ever holds user text: counts, sizes, hashes, identifiers and positions only.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Figure", "check_schema", "flag", "new_report", "write_report"]

SCHEMA_VERSION = 1


def new_report(kind: str, title: str) -> dict[str, Any]:
    """An empty report of ``kind`` (``pod`` or ``run``)."""
    return {"schema": SCHEMA_VERSION, "kind": kind, "title": title,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "red_flags": [], "sections": []}


def flag(report: dict[str, Any], code: str, message: str) -> None:
    """Raise a red flag (shown at the top; ``--strict`` exits non-zero on any)."""
    report["red_flags"].append({"code": code, "message": message})


class Figure:
    """A line or step chart: named series of (x, y) points, plus horizontal guides."""

    def __init__(self, title: str, xlabel: str, ylabel: str) -> None:
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.series: list[dict[str, Any]] = []
        self.guides: list[dict[str, Any]] = []

    def line(self, label: str, xs: Sequence[float], ys: Sequence[float | None],
             step: bool = False) -> Figure:
        self.series.append({"label": label, "x": list(xs), "y": list(ys), "step": step})
        return self

    def guide(self, label: str, y: float) -> Figure:
        self.guides.append({"label": label, "y": y})
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel,
                "series": self.series, "guides": self.guides}


def _png(figure: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    for s in figure["series"]:
        points = [(x, y) for x, y in zip(s["x"], s["y"], strict=True) if y is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        if s["step"]:
            ax.step(xs, ys, where="post", label=s["label"])
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=s["label"])
    for g in figure["guides"]:
        ax.axhline(g["y"], linestyle="--", color="crimson", linewidth=1, label=g["label"])
    if all(isinstance(x, int) for s in figure["series"] for x in s["x"]):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(figure["title"])
    ax.set_xlabel(figure["xlabel"])
    ax.set_ylabel(figure["ylabel"])
    ax.grid(alpha=0.3)
    if figure["series"] or figure["guides"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _schema() -> dict[str, Any]:
    text = resources.files("covey.privacy").joinpath("report.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def check_schema(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``report`` does not fit the schema."""
    import jsonschema

    jsonschema.validate(report, _schema())


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ r.title }}</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; max-width: 980px; margin: 2em auto;
        padding: 0 1em; color: #1d232a; }
 h1 { margin-bottom: .2em } .meta { color: #5b6570 }
 .flags { border: 2px solid #c0392b; background: #fdecea; padding: .6em 1em;
          border-radius: 6px } .flags h2 { color: #c0392b; margin: .2em 0 }
 .ok { border: 2px solid #1e8449; background: #e9f7ef; padding: .6em 1em;
       border-radius: 6px; color: #1e8449; font-weight: 600 }
 table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px }
 th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left;
          vertical-align: top }
 th { background: #f3f5f7 } td.num { text-align: right; font-variant-numeric: tabular-nums }
 section { margin-top: 1.6em } img { max-width: 100%; border: 1px solid #e1e4e8 }
 p.note { color: #3d4650 }
</style></head><body>
<h1>{{ r.title }}</h1>
<p class="meta">{{ r.kind }} report &middot; generated {{ r.generated_at }}</p>
{% if r.red_flags %}
<div class="flags" id="red-flags"><h2>Red flags ({{ r.red_flags|length }})</h2><ul>
{% for f in r.red_flags %}<li><b>{{ f.code }}</b>: {{ f.message }}</li>{% endfor %}
</ul></div>
{% else %}<div class="ok" id="red-flags">No red flags.</div>{% endif %}
{% for s in r.sections %}
<section id="{{ s.id }}"><h2>{{ s.title }}</h2>
{% for p in s.notes %}<p class="note">{{ p }}</p>{% endfor %}
{% for t in s.tables %}
{% if t.title %}<h3>{{ t.title }}</h3>{% endif %}
<table><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for v in row %}
<td{% if v is number %} class="num"{% endif %}>{{ fmt(v) }}</td>{% endfor %}</tr>
{% else %}<tr><td colspan="{{ t.columns|length }}">none</td></tr>{% endfor %}
</table>
{% endfor %}
{% for f in s.figures %}<figure><img alt="{{ f.title }}" src="{{ png(f) }}"></figure>
{% endfor %}
</section>
{% endfor %}
</body></html>
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (Jinja2 autoescaping on)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE).render(r=report, fmt=_fmt, png=_png)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and the same content as JSON beside it; both paths."""
    from covey._files import write_atomic

    check_schema(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    write_atomic(out, render_html(report).encode())
    write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
    return out, json_path


def section(report: dict[str, Any], id: str, title: str) -> dict[str, Any]:
    """Append and return an empty section."""
    s: dict[str, Any] = {"id": id, "title": title, "notes": [], "tables": [], "figures": []}
    report["sections"].append(s)
    return s


def table(sec: dict[str, Any], columns: Sequence[str], rows: Sequence[Sequence[Any]],
          title: str = "") -> None:
    """Add a table to a section."""
    sec["tables"].append({"title": title, "columns": list(columns),
                          "rows": [list(r) for r in rows]})
