"""A small synthetic instance collection on disk (the demo's and the tests' fallback when ``../shared/data`` is
absent): the views of :func:`operators.scenes.views` as a grouped manifest."""

from __future__ import annotations

from operators.scenes import views
from storage.collection import write_collection


def generate(out: str, groups: int = 8, per_group: int = 5, seed: int = 0) -> str:
    """Write the collection under ``out`` (:func:`storage.collection.write_collection`); returns its manifest."""
    return write_collection(out, views(groups, per_group, seed))
