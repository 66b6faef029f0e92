"""HTML pieces of the report pages (:mod:`jobs.report`, :mod:`jobs.mine`): thumbnails, the comparison page of
evaluated results (table, mAP bars, best rows) and the mined-pairs page. Rendering only: the pages are written
by :mod:`storage.results` and :mod:`storage.pairs`."""

from __future__ import annotations

import base64
import html
import typing
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from operators.images import resize_max_side
from storage import fs as sfs
from storage.collection import read_image
from storage.results import report_page_uri

if typing.TYPE_CHECKING:
    from jobs.report import CompareConfig

COLORS = {"positive": "#2e9e44", "ignored": "#9a9a9a", "negative": "#d0342c"}


def thumbnail(uri: str, box: tuple, side: int, options: dict) -> str | None:
    """A JPEG data URI of the image at max side ``side``, ``box`` drawn; None when unreadable."""
    try:
        img, f = resize_max_side(read_image(uri, options), side)
    except Exception:  # noqa: BLE001 - a missing image shows as an empty frame
        return None
    img = np.ascontiguousarray(img[:, :, ::-1])  # RGB -> BGR for OpenCV
    if box is not None and not any(np.isnan(box)):
        x0, y0, x1, y1 = (int(round(v * f)) for v in box)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 220, 255), 2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


RERANK_COLORS = {
    "none": "#1f6fb2",
    "aqe": "#7fb8e6",
    "alpha-qe": "#2e9e44",
    "dfs": "#d0342c",
    "truncated-dfs": "#f08a5d",
    "fsr": "#8e44ad",
    "hybrid": "#e0a800",
    "offline": "#555555",
}


def bars_svg(
    labels: list[str],
    values: list[float],
    colors: list[str],
    unit: str,
    width: int = 640,
    start: float = 0.0,
    best: int | None = None,
) -> str:
    """Horizontal bars with their values, one per label (inline SVG). The axis runs from ``start`` (said under
    the plot when not 0, so near values read apart); bar ``best`` is outlined and starred."""
    top = max(values) if values and max(values) > start else start + 1.0
    h, left = 18, 230
    items = []
    for i, (lab, v, c) in enumerate(zip(labels, values, colors)):
        y, w = 4 + i * h, max(1.0, (width - left - 70) * (v - start) / (top - start))
        mark = ' stroke="#000" stroke-width="2"' if i == best else ""
        items.append(
            f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{html.escape(lab)}</text>'
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{h - 4}" fill="{c}"{mark}/>'
            f'<text x="{left + w + 4:.1f}" y="{y + 12}">{v:.1f} {unit}{" ★" if i == best else ""}</text>'
        )
    axis = f'<text x="{left}" y="{16 + h * len(labels)}" fill="#666">axis from {start:g} {unit}</text>' if start else ""
    return (
        f'<svg width="{width}" height="{22 + h * len(labels)}" style="font:11px sans-serif">'
        f"{''.join(items)}{axis}</svg>"
    )


def axis_start(values: list[float]) -> float:
    """Where a mAP axis starts: 10 points below the lowest value, rounded down to a multiple of 10 (0 at least)."""
    return max(0.0, float(np.floor((min(values) - 10) / 10) * 10)) if values else 0.0


def comparison_page(cfg: CompareConfig, rows: pd.DataFrame, index_summary: dict | None) -> str:
    order = rows  # as given: the caller's order reads best (the demo: query set, method, re-ranking)
    labels = [f"{q} · {m} + {r}" for q, m, r in zip(order["queries"], order["method"], order["rerank"])]
    colors = [RERANK_COLORS.get(r, "#444") for r in order["rerank"]]
    legend = " ".join(
        f'<span style="color:{c}">■</span> {html.escape(r)}'
        for r, c in RERANK_COLORS.items()
        if r in set(order["rerank"])
    )
    shown = [c for c in rows.columns if c not in ("results", "index") and not c.startswith("time ")]
    best = best_rows(order)
    table = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in shown)
        + "</tr>"
        + "".join(
            ("<tr style='font-weight:bold;background:#eef6e8'>" if i in best else "<tr>")
            + "".join(f"<td>{v:.2f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>" for v in r)
            + "</tr>"
            for i, r in enumerate(order[shown].itertuples(index=False))
        )
        + "</table>"
    )
    index_part = ""
    if index_summary:
        stages = index_summary.get("timings_s", {})
        index_part = (
            f"<h3>Index: time per stage of its last run ({index_summary.get('total_s', 0):.0f} s in all)</h3>"
            + bars_svg(list(stages), list(stages.values()), ["#888"] * len(stages), "s")
        )
    links = "".join(
        f'<li><a href="{html.escape(sfs.relative_link(report_page_uri(r), cfg.out))}">{html.escape(r)}</a></li>'
        for r in order["results"]
    )
    maps = order["mAP"].tolist()
    return COMPARISON.format(
        title=html.escape(cfg.title),
        index=html.escape(str(rows["index"].iloc[0])),
        table=table,
        legend=legend,
        map_plot=bars_svg(
            labels, maps, colors, "mAP", start=axis_start(maps), best=int(np.argmax(maps)) if maps else None
        ),
        time_plot=bars_svg(labels, order["ms_per_query"].tolist(), colors, "ms/query"),
        index_part=index_part,
        links=links,
    )


def best_rows(rows: pd.DataFrame) -> set[int]:
    """Positions of the rows with the highest mAP of each query set (whole, each crop): bold in the table."""
    pos = rows.reset_index(drop=True)
    return {int(i) for i in pos.groupby("queries")["mAP"].idxmax().tolist()} if len(pos) else set()


COMPARISON = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:14px sans-serif;margin:20px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h2>{title}</h2><p>index: {index}</p>{table}
<p>In bold: the best mAP of each query set.</p>
<h3>mAP per method and re-ranking</h3><p>{legend}</p>{map_plot}
<h3>Search time per query (ranking + re-ranking; query description excluded, it is cached)</h3>{time_plot}
{index_part}<h3>Per-query galleries</h3><ul>{links}</ul></body></html>
"""


def pairs_page(table: pa.Table, anchors: int, options: dict, shown: int = 8, thumb: int = 96) -> str:
    """Sample anchors of each source with their strongest positives (green) and negatives (red)."""
    df = table.to_pandas()
    sections = []
    with ThreadPoolExecutor(8) as pool:
        for source, rows in df.groupby("source", sort=False):
            picked = rows.groupby("anchor_id")["score"].size().sort_values(ascending=False).index[:anchors]
            for anchor in picked:
                mine = rows[rows.anchor_id == anchor]
                pos = mine[mine.label == 1].nlargest(shown, "score")
                neg = mine[mine.label == 0].nlargest(shown, "score")
                cells = [pool.submit(thumbnail, mine.anchor_file.iloc[0], None, thumb, options)]
                cells += [pool.submit(thumbnail, f, None, thumb, options) for f in [*pos.other_file, *neg.other_file]]
                colors = ["#f0c000"] + [COLORS["positive"]] * len(pos) + [COLORS["negative"]] * len(neg)
                titles = (
                    [f"anchor {anchor}"]
                    + [f"+ {o} ({s:.3f})" for o, s in zip(pos.other_id, pos.score)]
                    + [f"− {o} ({s:.3f})" for o, s in zip(neg.other_id, neg.score)]
                )
                sections.append((source, anchor, len(pos), len(neg), cells, colors, titles))
        body = "".join(
            f'<div class="q"><div class="h">{html.escape(source)} · anchor {anchor}: {p} positive(s), {n} negative(s)'
            f"</div>"
            + "".join(
                f'<div class="t" style="border-color:{c};width:{thumb}px;height:{thumb}px" title="{html.escape(t)}">'
                + (f'<img src="{f.result()}">' if f.result() else "<span>?</span>")
                + "</div>"
                for f, c, t in zip(cells, colors, titles)
            )
            + "</div>"
            for source, anchor, p, n, cells, colors, titles in sections
        )
    counts = df.groupby(["source", "label"]).size()
    summary = ", ".join(f"{s} {'positives' if lab == 1 else 'negatives'}: {v}" for (s, lab), v in counts.items())
    return PAIRS.format(summary=html.escape(summary), body=body)


PAIRS = """<!doctype html><html><head><meta charset="utf-8"><title>mined pairs</title>
<style>body{{font:14px sans-serif;margin:20px}} .q{{margin:10px 0}} .h{{font-weight:bold;margin-bottom:3px}}
.t{{display:inline-block;border:4px solid;margin:2px;vertical-align:top;text-align:center;overflow:hidden}}
.t img{{max-width:100%;max-height:100%}}</style></head><body>
<h2>Mined training pairs</h2><p>{summary}</p>
<p><span style="color:#f0c000">■</span> anchor <span style="color:#2e9e44">■</span> positives (strongest first)
<span style="color:#d0342c">■</span> negatives (hardest first)</p>{body}</body></html>
"""
