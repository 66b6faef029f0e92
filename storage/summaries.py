"""Job summaries (``summary-<job>.json``: counts, timings, peak memory) and the failed-images list
(``failed-images.csv``: image id, file, reason), written next to the artifacts a job made."""

from __future__ import annotations

import io

import pandas as pd

from storage import fs as sfs


def write_summary(folder: str, job: str, summary: dict, options: dict | None = None) -> str:
    uri = sfs.join(folder, f"summary-{job}.json")
    sfs.write_json(uri, summary, options)
    return uri


def read_summary(folder: str, job: str, options: dict | None = None) -> dict | None:
    """``summary-<job>.json`` of ``folder``, None when that job has not finished there."""
    uri = sfs.join(folder, f"summary-{job}.json")
    return sfs.read_json(uri, options) if sfs.exists(uri, options) else None


def write_failed_images(folder: str, failed: pd.DataFrame, options: dict | None = None) -> str:
    """``failed-images.csv`` with columns image_id, file, error (rewritten whole each run)."""
    buf = io.StringIO()
    failed[["image_id", "file", "error"]].to_csv(buf, index=False)
    uri = sfs.join(folder, "failed-images.csv")
    sfs.write_bytes(uri, buf.getvalue().encode(), options)
    return uri
