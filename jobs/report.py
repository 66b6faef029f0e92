"""Reports: the per-query gallery of one evaluated search, and the comparison of several.

``retrieval report --results RES1,RES2,… --out DIR`` (``python -m jobs.report``) writes
``DIR/comparison.html`` and ``DIR/comparison.csv``: each evaluated results folder's method,
re-ranking, query set, mAP, mP@k and time per query, a mAP-per-method plot, search time per query
and the index's time per stage. It also prints the table.

The gallery, ``RES/report.html``, is written by ``jobs.evaluate``. It shows the metrics of every
setup, each query's AP as a sorted curve (inline SVG), and the worst and best queries with their
top results as thumbnails (embedded JPEGs, so the page works from S3 or a laptop alike). The
query's box is drawn in yellow; results are framed by relevance: green positive, grey ignored
(junk), red negative. Only ``2 · shown`` queries and ``depth`` results
each are read, whatever the size of the collection.
"""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs.config import parse, run_cli
from jobs.report_pages import COLORS, comparison_page, thumbnail
from operators.constraints import Count
from storage.artifacts import ArtifactRoot
from storage.results import read_metrics, write_comparison, write_report_page
from storage.summaries import read_summary


@dataclass
class ReportConfig:
    enabled: bool = True
    shown: Count = 12  # worst and best queries shown (each)
    depth: Count = 10  # results shown per query
    thumb: Count = 112  # thumbnail max side in px


def ap_curve_svg(aps: np.ndarray, width: int = 560, height: int = 160) -> str:
    """Per-query AP sorted in decreasing order, as an SVG polyline with a 0–1 axis."""
    aps = np.sort(aps[~np.isnan(aps)])[::-1]
    if len(aps) == 0:
        return "<p>no query with positives</p>"
    x = np.linspace(30, width - 5, len(aps)) if len(aps) > 1 else np.array([30.0])
    y = 5 + (1 - aps) * (height - 25)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    return (
        f'<svg width="{width}" height="{height}" style="font:11px sans-serif">'
        f'<line x1="30" y1="5" x2="30" y2="{height - 20}" stroke="#444"/>'
        f'<line x1="30" y1="{height - 20}" x2="{width - 5}" y2="{height - 20}" stroke="#444"/>'
        f'<text x="2" y="12">1.0</text><text x="2" y="{height - 20}">0.0</text>'
        f'<text x="{width // 2 - 60}" y="{height - 4}">queries by AP ({len(aps)})</text>'
        f'<polyline fill="none" stroke="#1f6fb2" stroke-width="2" points="{points}"/></svg>'
    )


def metrics_table(metrics: dict[str, dict], ks: list[int]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ["setup", "queries", "mAP", *(f"mP@{k}" for k in ks)])
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{m['queries']}</td><td>{100 * m['mAP']:.2f}</td>"
        + "".join(f"<td>{100 * m[f'mP@{k}']:.2f}</td>" for k in ks)
        + "</tr>"
        for s, m in metrics.items()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def run_table(run: dict) -> str:
    """What made the results: method, re-ranking, parameters, index, queries and time per stage."""
    params = run.get("params") or {}
    rows = [
        ("method", run.get("method")),
        ("re-ranking", run.get("rerank")),
        ("index", run.get("index")),
        ("queries", run.get("queries")),
        ("centre crop", run.get("center_crop")),
        ("ranking depth", run.get("ranking_depth")),
        *((f"param {k}", v) for k, v in params.items()),
        *((f"time: {k}", f"{v:.2f} s") for k, v in (run.get("timings_s") or {}).items()),
    ]
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
        if v is not None
    )
    return f"<table>{body}</table>"


def relevance(ids: np.ndarray, positives: np.ndarray, ignore: np.ndarray) -> list[str]:
    pos, ign = set(np.asarray(positives).tolist()), set(np.asarray(ignore).tolist())
    return ["positive" if i in pos else "ignored" if i in ign else "negative" for i in ids.tolist()]


def pick_queries(aps: np.ndarray, shown: int) -> list[int]:
    """Row indices of the ``shown`` worst then the ``shown`` best queries with positives."""
    valid = np.flatnonzero(~np.isnan(aps))
    order = valid[np.argsort(aps[valid], kind="stable")]
    worst = order[:shown].tolist()
    return worst + [i for i in order[::-1][:shown].tolist() if i not in worst]


def query_files(queries_root: str | None, options: dict, database: pd.DataFrame) -> pd.DataFrame:
    """file and box of every query id: the described queries (jobs.search) or the database (jobs.rerank).

    Boxes are the ones the queries were described with (their shards record them, centre crops included).
    """
    if queries_root is None:
        return database.set_index("image_id").reindex(columns=["file", "x0", "y0", "x1", "y1"])
    root = ArtifactRoot(queries_root, options)
    queries = root.images()
    table = (
        (queries if queries is not None else database)
        .set_index("image_id")
        .reindex(columns=["file", "x0", "y0", "x1", "y1"])
    )
    if queries is not None and root.shards().indices():
        boxes = root.shards().read_all(["image_id", "x0", "y0", "x1", "y1"]).to_pandas().set_index("image_id")
        table.update(boxes)
    return table


def write_report(
    results: str,
    options: dict,
    cfg: ReportConfig,
    metrics: dict[str, dict],
    ks: list[int],
    setup: str,
    table: pd.DataFrame,
    positives: list[np.ndarray],
    ignore: list[np.ndarray],
    database: pd.DataFrame,
    run: dict | None = None,
) -> str:
    """Write ``RES/report.html`` for the rows of ``table`` (query_id, query_name, ids, ap); returns its URI.

    ``run``: ``run.json`` of the results (what made them; its ``queries_root`` locates the query images).
    """
    run = run or {}
    aps = table["ap"].to_numpy(float)
    chosen = pick_queries(aps, cfg.shown)
    qfiles, dbfiles = query_files(run.get("queries_root"), options, database), database.set_index("image_id")["file"]
    jobs = {}
    with ThreadPoolExecutor(8) as pool:
        for r in chosen:
            q = table.iloc[r]
            row = qfiles.loc[q.query_id] if q.query_id in qfiles.index else None
            box = tuple(row[["x0", "y0", "x1", "y1"]].astype(float)) if row is not None else None
            jobs[(r, "q")] = pool.submit(thumbnail, row["file"], box, cfg.thumb, options) if row is not None else None
            for i in np.asarray(q.ids)[: cfg.depth]:
                if i in dbfiles.index:
                    jobs[(r, int(i))] = pool.submit(thumbnail, dbfiles[i], None, cfg.thumb, options)
        thumbs = {k: (f.result() if f is not None else None) for k, f in jobs.items()}
    sections = [
        query_section(
            table.iloc[r],
            thumbs,
            relevance(np.asarray(table.iloc[r].ids)[: cfg.depth], positives[r], ignore[r]),
            r,
            cfg,
        )
        for r in chosen
    ]
    page = PAGE.format(
        title=html.escape(results),
        run=run_table(run),
        table=metrics_table(metrics, ks),
        setup=html.escape(setup),
        curve=ap_curve_svg(aps),
        shown=cfg.shown,
        queries="".join(sections),
        thumb=cfg.thumb,
    )
    return write_report_page(results, page, options)


def query_section(q, thumbs: dict, rel: list[str], r: int, cfg: ReportConfig) -> str:
    def img(src, color, title):
        inner = f'<img src="{src}">' if src else "<span>?</span>"
        return f'<div class="t" style="border-color:{color}" title="{html.escape(title)}">{inner}</div>'

    cells = [img(thumbs.get((r, "q")), "#f0c000", f"query {q.query_name}")]
    for rank, (i, kind) in enumerate(zip(np.asarray(q.ids)[: cfg.depth].tolist(), rel), 1):
        cells.append(img(thumbs.get((r, int(i))), COLORS[kind], f"#{rank} id {i}: {kind}"))
    return (
        f'<div class="q"><div class="h">{html.escape(str(q.query_name))} — AP {100 * q.ap:.1f}</div>'
        f"{''.join(cells)}</div>"
    )


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>retrieval report: {title}</title>
<style>body{{font:14px sans-serif;margin:20px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} .q{{margin:10px 0}}
.h{{font-weight:bold;margin-bottom:3px}} .t{{display:inline-block;border:4px solid;margin:2px;
width:{thumb}px;height:{thumb}px;vertical-align:top;text-align:center;overflow:hidden}}
.t img{{max-width:100%;max-height:100%}}</style></head><body>
<h2>{title}</h2>{run}<h3>Metrics</h3>{table}
<h3>AP per query ({setup})</h3>{curve}
<h3>The {shown} worst and best queries ({setup}): query (box in yellow), then its top results</h3>
<p><span style="color:#2e9e44">■</span> positive <span style="color:#9a9a9a">■</span> ignored
<span style="color:#d0342c">■</span> negative</p>{queries}</body></html>
"""


# ------------------------------------------------------------------------------------------
# The comparison page: ``retrieval report --results RES1,RES2,… --out DIR``
# ------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CompareConfig:
    results: list[str]  # evaluated results folders (jobs.search + jobs.evaluate) (required)
    out: str  # folder receiving comparison.html and comparison.csv (required)
    title: str = "Method comparison"
    setup: str = "medium"  # revisited ground truth: the setup compared (group ground truth has one)
    storage: dict = field(default_factory=dict)


def comparison_rows(cfg: CompareConfig) -> pd.DataFrame:
    """One row per results folder: what made it, its mAP / mP@k and its time per query."""
    rows = []
    for res in cfg.results:
        metrics = read_metrics(res, cfg.storage)
        run = metrics.get("run") or {}
        m = metrics if "mAP" in metrics else metrics[cfg.setup]
        timings = run.get("timings_s") or {}
        searching = sum(v for k, v in timings.items() if k != "extract queries")
        n = run.get("queries") or m["queries"]
        crop = run.get("center_crop")
        depth = metrics.get("ranking_depth") or {}
        rows.append(
            {
                "results": res,
                "method": run.get("method"),
                "rerank": run.get("rerank") or "none",
                "queries": "whole" if crop is None else f"crop {crop:g}",
                "n_queries": n,
                "ranked": f"top {depth['depth']} of {depth['database']}" if depth.get("truncated") else "all",
                "mAP": 100 * m["mAP"],
                **{k: 100 * m[k] for k in sorted((k for k in m if k.startswith("mP@")), key=lambda k: int(k[3:]))},
                "ms_per_query": 1000 * searching / max(n, 1),
                "describe_s": timings.get("extract queries", 0.0),
                **{f"time {k}": v for k, v in timings.items() if k != "extract queries"},
                "index": run.get("index"),
            }
        )
    return pd.DataFrame(rows)


def print_comparison(rows: pd.DataFrame) -> None:
    pivot = rows.pivot_table(
        index=["method", "rerank"], columns="queries", values=["mAP", "ms_per_query"], aggfunc="first", sort=False
    )
    cols = sorted(rows["queries"].unique(), key=lambda q: (q != "whole", q))
    head = f"{'method':<8} {'re-ranking':<14}" + "".join(f" {('mAP ' + q):>13} {'ms/q':>7}" for q in cols)
    print(head)
    for (method, rerank), r in pivot.iterrows():
        print(
            f"{method:<8} {rerank:<14}"
            + "".join(
                f" {r[('mAP', q)]:>13.2f} {r[('ms_per_query', q)]:>7.1f}"
                if ("mAP", q) in r and pd.notna(r[("mAP", q)])
                else f" {'-':>13} {'-':>7}"
                for q in cols
            )
        )


FLAGS = {
    "--results": ("results", "comma-separated evaluated results folders"),
    "--out": ("out", "folder receiving comparison.html and comparison.csv"),
    "--title": ("title", "page title"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Compare evaluated results: one page with a table, a mAP-per-method plot and time per stage."""
    cfg = parse(CompareConfig, argv, FLAGS, __doc__, prog)
    rows = comparison_rows(cfg)
    index = rows["index"].dropna()
    summary = read_summary(str(index.iloc[0]), "index", cfg.storage) if len(index) else None
    uri = write_comparison(
        cfg.out, comparison_page(cfg, rows, summary), pa.Table.from_pandas(rows, preserve_index=False), cfg.storage
    )
    print_comparison(rows)
    print(f"comparison: {uri}")
    return {"page": uri, "rows": len(rows)}


if __name__ == "__main__":
    run_cli(main)


# ------------------------------------------------------------------------------------------
# Mined pairs: ``PAIRS/pairs.html`` (jobs.mine)
# ------------------------------------------------------------------------------------------
