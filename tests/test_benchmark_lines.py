"""The stable last lines of the benchmarks that other tools read (no job runs here)."""

from __future__ import annotations

import pandas as pd

from benchmarks.scale import latency_lines


def test_scale_prints_one_latency_line_per_method_of_its_crop_queries():
    df = pd.DataFrame(
        [
            {"queries": "0.4", "method": "global", "rerank": "none", "mAP": 68.494, "p50_ms": 12.34},
            {"queries": "0.4", "method": "global", "rerank": "dfs", "mAP": 70.1, "p50_ms": 40.0},
            {"queries": "whole", "method": "fused", "rerank": "none", "mAP": 99.0, "p50_ms": 1.0},
        ]
    )
    assert latency_lines(df) == [
        "latency global: p50_ms 12.3, map_crops 68.49",
        "latency global+dfs: p50_ms 40.0, map_crops 70.10",
    ]


def test_scale_recall_compares_the_approximate_global_top_k_with_brute_force(tmp_path):
    from benchmarks.scale import recall_at

    def results(name: str, ids: list[list[int]]) -> None:
        (tmp_path / "search" / name).mkdir(parents=True)
        pd.DataFrame({"query_id": range(len(ids)), "ids": ids}).to_parquet(
            tmp_path / "search" / name / "results.parquet"
        )

    assert recall_at(tmp_path, "0.4") is None  # nothing ran
    results("0.4-global-none", [[1, 2, 3], [4, 5, 6]])
    results("0.4-global_exact-none", [[3, 2, 9], [4, 5]])  # a query may have fewer results than k
    assert recall_at(tmp_path, "0.4", k=3) == (2 / 3 + 2 / 2) / 2
    assert recall_at(tmp_path, "0.4", k=1) == (0 + 1) / 2
