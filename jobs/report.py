"""Evaluation report: one self-contained HTML page, ``RES/report.html``, written by ``jobs.evaluate``.

It shows the metrics of every setup, each query's AP as a sorted curve (inline SVG), and the
worst and best queries with their top results as thumbnails (embedded JPEGs, so the page works
from S3 or a laptop alike). The query's box is drawn in yellow; results are framed by relevance:
green positive, grey ignored (junk), red negative. Only ``2 · shown`` queries and ``depth`` results
each are read, whatever the size of the collection.
"""
from __future__ import annotations

import base64
import html
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from operators.images import decode_image, resize_max_side
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.collection import read_image_bytes
from storage.results import write_report_page

COLORS = {"positive": "#2e9e44", "ignored": "#9a9a9a", "negative": "#d0342c"}


@dataclass
class ReportConfig:
    enabled: bool = True
    shown: int = 12         # worst and best queries shown (each)
    depth: int = 10         # results shown per query
    thumb: int = 112        # thumbnail max side in px


def thumbnail(uri: str, box: tuple, side: int, options: dict) -> str | None:
    """A JPEG data URI of the image at max side ``side``, ``box`` drawn; None when unreadable."""
    try:
        img, f = resize_max_side(decode_image(read_image_bytes(uri, options)), side)
    except Exception:  # noqa: BLE001 - a missing image shows as an empty frame
        return None
    img = np.ascontiguousarray(img[:, :, ::-1])  # RGB -> BGR for OpenCV
    if box is not None and not any(np.isnan(box)):
        x0, y0, x1, y1 = (int(round(v * f)) for v in box)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 220, 255), 2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


def ap_curve_svg(aps: np.ndarray, width: int = 560, height: int = 160) -> str:
    """Per-query AP sorted in decreasing order, as an SVG polyline with a 0–1 axis."""
    aps = np.sort(aps[~np.isnan(aps)])[::-1]
    if len(aps) == 0:
        return "<p>no query with positives</p>"
    x = np.linspace(30, width - 5, len(aps)) if len(aps) > 1 else np.array([30.0])
    y = 5 + (1 - aps) * (height - 25)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    return (f'<svg width="{width}" height="{height}" style="font:11px sans-serif">'
            f'<line x1="30" y1="5" x2="30" y2="{height - 20}" stroke="#444"/>'
            f'<line x1="30" y1="{height - 20}" x2="{width - 5}" y2="{height - 20}" stroke="#444"/>'
            f'<text x="2" y="12">1.0</text><text x="2" y="{height - 20}">0.0</text>'
            f'<text x="{width // 2 - 60}" y="{height - 4}">queries by AP ({len(aps)})</text>'
            f'<polyline fill="none" stroke="#1f6fb2" stroke-width="2" points="{points}"/></svg>')


def metrics_table(metrics: dict[str, dict], ks: list[int]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ["setup", "queries", "mAP", *(f"mP@{k}" for k in ks)])
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{m['queries']}</td><td>{100 * m['mAP']:.2f}</td>"
        + "".join(f"<td>{100 * m[f'mP@{k}']:.2f}</td>" for k in ks) + "</tr>"
        for s, m in metrics.items())
    return f"<table><tr>{head}</tr>{rows}</table>"


def relevance(ids: np.ndarray, positives: np.ndarray, ignore: np.ndarray) -> list[str]:
    pos, ign = set(np.asarray(positives).tolist()), set(np.asarray(ignore).tolist())
    return ["positive" if i in pos else "ignored" if i in ign else "negative" for i in ids.tolist()]


def pick_queries(aps: np.ndarray, shown: int) -> list[int]:
    """Row indices of the ``shown`` worst then the ``shown`` best queries with positives."""
    valid = np.flatnonzero(~np.isnan(aps))
    order = valid[np.argsort(aps[valid], kind="stable")]
    worst = order[:shown].tolist()
    return worst + [i for i in order[::-1][:shown].tolist() if i not in worst]


def query_files(results: str, options: dict, database: pd.DataFrame) -> pd.DataFrame:
    """file and box of every query id: ``RES/queries`` (jobs.search) or the database (jobs.rerank).

    Boxes are the ones the queries were described with (their shards record them, centre crops included).
    """
    root = ArtifactRoot(sfs.join(results, "queries"), options)
    queries = root.images()
    table = (queries if queries is not None else database).set_index("image_id").reindex(
        columns=["file", "x0", "y0", "x1", "y1"])
    if queries is not None and root.shards().indices():
        boxes = root.shards().read_all(["image_id", "x0", "y0", "x1", "y1"]).to_pandas().set_index("image_id")
        table.update(boxes)
    return table


def write_report(results: str, options: dict, cfg: ReportConfig, metrics: dict[str, dict], ks: list[int],
                 setup: str, table: pd.DataFrame, positives: list[np.ndarray], ignore: list[np.ndarray],
                 database: pd.DataFrame) -> str:
    """Write ``RES/report.html`` for the rows of ``table`` (query_id, query_name, ids, ap); returns its URI."""
    aps = table["ap"].to_numpy(float)
    chosen = pick_queries(aps, cfg.shown)
    qfiles, dbfiles = query_files(results, options, database), database.set_index("image_id")["file"]
    jobs = {}
    with ThreadPoolExecutor(8) as pool:
        for r in chosen:
            q = table.iloc[r]
            row = qfiles.loc[q.query_id] if q.query_id in qfiles.index else None
            box = tuple(row[["x0", "y0", "x1", "y1"]].astype(float)) if row is not None else None
            jobs[(r, "q")] = pool.submit(thumbnail, row["file"], box, cfg.thumb, options) if row is not None else None
            for i in np.asarray(q.ids)[:cfg.depth]:
                if i in dbfiles.index:
                    jobs[(r, int(i))] = pool.submit(thumbnail, dbfiles[i], None, cfg.thumb, options)
        thumbs = {k: (f.result() if f is not None else None) for k, f in jobs.items()}
    sections = [query_section(table.iloc[r], thumbs, relevance(np.asarray(table.iloc[r].ids)[:cfg.depth],
                                                                 positives[r], ignore[r]), r, cfg)
                for r in chosen]
    page = PAGE.format(title=html.escape(results), table=metrics_table(metrics, ks), setup=html.escape(setup),
                       curve=ap_curve_svg(aps), shown=cfg.shown, queries="".join(sections), thumb=cfg.thumb)
    return write_report_page(results, page, options)


def query_section(q, thumbs: dict, rel: list[str], r: int, cfg: ReportConfig) -> str:
    def img(src, color, title):
        inner = f'<img src="{src}">' if src else "<span>?</span>"
        return f'<div class="t" style="border-color:{color}" title="{html.escape(title)}">{inner}</div>'
    cells = [img(thumbs.get((r, "q")), "#f0c000", f"query {q.query_name}")]
    for rank, (i, kind) in enumerate(zip(np.asarray(q.ids)[:cfg.depth].tolist(), rel), 1):
        cells.append(img(thumbs.get((r, int(i))), COLORS[kind], f"#{rank} id {i}: {kind}"))
    return (f'<div class="q"><div class="h">{html.escape(str(q.query_name))} — AP {100 * q.ap:.1f}</div>'
            f'{"".join(cells)}</div>')


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>retrieval report: {title}</title>
<style>body{{font:14px sans-serif;margin:20px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} .q{{margin:10px 0}}
.h{{font-weight:bold;margin-bottom:3px}} .t{{display:inline-block;border:4px solid;margin:2px;
width:{thumb}px;height:{thumb}px;vertical-align:top;text-align:center;overflow:hidden}}
.t img{{max-width:100%;max-height:100%}}</style></head><body>
<h2>{title}</h2>{table}
<h3>AP per query ({setup})</h3>{curve}
<h3>The {shown} worst and best queries ({setup}): query (box in yellow), then its top results</h3>
<p><span style="color:#2e9e44">■</span> positive <span style="color:#9a9a9a">■</span> ignored
<span style="color:#d0342c">■</span> negative</p>{queries}</body></html>
"""
