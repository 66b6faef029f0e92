"""Graph centrality of the index's kNN graph: ``ROOT/centrality/`` (:mod:`operators.centrality`).

stationary.npy, pagerank.npy, katz.npy   (n,) float64, row i ↔ image ``global/ids.npy[i]``
modes.npy                                image ids of the modes of π, best first
meta.json                                parameters, counts, the graph it was computed on
"""

from __future__ import annotations

import numpy as np

from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError

SCORES = ("stationary", "pagerank", "katz")


def write_centrality(root: ArtifactRoot, scores: dict[str, np.ndarray], modes: np.ndarray, meta: dict) -> None:
    for name in SCORES:
        root.write_array(f"centrality/{name}.npy", np.asarray(scores[name], np.float64))
    root.write_array("centrality/modes.npy", np.asarray(modes, np.int64))
    root.write_json("centrality/meta.json", meta)


def load_centrality(root: ArtifactRoot) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """The scores by name (memory-mapped), the modes (image ids, best first) and the meta."""
    if not root.exists("centrality/meta.json"):
        raise ArtifactError(f"{root.uri} has no centrality: run retrieval discover --index {root.uri}")
    scores = {name: root.load_array(f"centrality/{name}.npy") for name in SCORES}
    return scores, np.asarray(root.load_array("centrality/modes.npy")), root.read_json("centrality/meta.json")
