"""RootSIFT local features (OpenCV DoG-SIFT), the weight-free input of ASMK.

RootSIFT (ASMK IJCV L7495-7500): SIFT → component-wise sqrt after L1 normalisation, which is
L2-normalised by construction (Arandjelović & Zisserman). SIFT's DoG scale space is multi-scale
by nature; features are ranked by detector response and the ``n`` strongest kept.
"""

from __future__ import annotations

import cv2
import numpy as np

from operators.images import resize_max_side


def rootsift(desc: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """sqrt(d / ||d||_1) per row: unit L2 norm, Hellinger kernel on SIFT."""
    desc = np.asarray(desc, np.float32)
    return np.sqrt(desc / (np.abs(desc).sum(axis=1, keepdims=True) + eps))


class RootSift:
    """Batch callable: RGB uint8 images -> per-image dicts of RootSIFT features (strongest first).

    Coordinates and sizes are in pixels of the image given (before the internal resize to
    ``max_side``).
    """

    dim = 128

    def __init__(self, max_side: int = 1024, n: int = 2000):
        self.max_side, self.n = max_side, n
        self.sift = cv2.SIFT_create(nfeatures=n)

    def __call__(self, images: list[np.ndarray]) -> list[dict]:
        return [self.describe(img) for img in images]

    def describe(self, img: np.ndarray) -> dict:
        small, factor = resize_max_side(img, self.max_side)
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        kps, desc = self.sift.detectAndCompute(gray, None)
        if desc is None or not kps:
            z = np.zeros
            return {
                "local_desc": z((0, 128), np.float32),
                "local_xy": z((0, 2), np.float32),
                "local_scale": z(0, np.float32),
                "local_strength": z(0, np.float32),
            }
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[: self.n]
        xy = np.array([k.pt for k in kps], np.float32)[order] / factor
        size = np.array([k.size for k in kps], np.float32)[order] / factor
        return {"local_desc": rootsift(desc[order]), "local_xy": xy, "local_scale": size, "local_strength": resp[order]}
