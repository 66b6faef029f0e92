"""The demo's fallback collection (used when ../shared/data is absent) is a valid grouped manifest."""

from __future__ import annotations

from operators.images import decode_image
from storage.collection import load_collection
from storage.synthetic_collection import generate


def test_generated_collection(tmp_path):
    path = generate(str(tmp_path), groups=3, per_group=2)
    df = load_collection(path)
    assert len(df) == 6 and df["group"].value_counts().tolist() == [2, 2, 2]
    img = decode_image(open(df.file[0], "rb").read())
    assert img.shape == (640, 640, 3) and img.std() > 10
