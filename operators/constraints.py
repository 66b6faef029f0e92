"""Value ranges of config fields: ``Annotated`` pydantic constraints, enforced where a config is validated
(:func:`jobs.config.from_dict`: every flag, ``--set`` and YAML value, one-line :class:`ConfigError`).

A leaf module (pydantic only), so that ``operators``, ``cluster`` and ``jobs`` share one set without
importing each other. ``typing.get_type_hints`` drops the annotations: a field's ``Literal`` choices,
flags and defaults read as before, and settings digests (of values) do not change.

Every float is finite (no NaN, no ±inf: they would reach ``run.json`` and the kernels); every int is
bounded by :data:`MAX_COUNT` (a C int for faiss, OpenMP and numba; no sane size or count comes near).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_COUNT = 2**31 - 1

Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]  # sizes, k, iterations, blocks, top-k: at least 1
AtLeast2 = Annotated[int, Field(ge=2, le=MAX_COUNT)]  # a k-means k, HNSW links, a k counting the item itself
NonNegInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]  # 0 has a documented meaning (auto / off / none)
Seed = Annotated[int, Field(ge=0, le=MAX_COUNT)]  # numpy generators want ≥ 0, faiss a C int
ImageId = Annotated[int, Field(ge=0, le=2**53)]  # ids: ≥ 0 (−1 is the padding), exact in JSON


def _odd(v: int) -> int:
    if v % 2 == 0:
        raise ValueError("must be odd (a centred window)")
    return v


OddCount = Annotated[int, Field(ge=1, le=MAX_COUNT), AfterValidator(_odd)]

Finite = Annotated[float, Field(allow_inf_nan=False)]
PosFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # scales, exponents, σ, learning rates
NonNegFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # weights, regularisers, noise (0: none)
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # (0, 1]: a crop, a kept fraction
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # [0, 1]
OpenUnit = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # (0, 1): diffusion / Katz α, PageRank β
Tolerance = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # relative residual / accuracy (0: exact)
Similarity = Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)]  # a threshold on cosine-like similarities
Percentile = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # [0, 1): a dropout rate

Scales = Annotated[list[PosFinite], Field(min_length=1)]  # image scales: at least one, each > 0
Widths = Annotated[list[Count], Field(min_length=1)]  # layer widths: at least one layer
ObjectStoreMB = Annotated[int, Field(ge=75, le=MAX_COUNT)]  # Ray refuses an object store under 75 MiB
