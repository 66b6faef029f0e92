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
