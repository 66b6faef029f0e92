"""Generate a small synthetic instance collection (used when ``../shared/data`` is absent).

``python -m jobs.synthetic --out DIR [--groups 8 --per-group 5]`` writes ``DIR/images/*.jpg`` and
``DIR/images.csv`` (``file, group``). Each group is one random "object" (a textured scene of
shapes) seen under random homographies, scale and brightness changes, so images of a group
share local structure the way photos of one landmark do.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.config import parse, report_stream, run_cli
from operators.constraints import Count, Seed
from storage.synthetic_collection import generate


@dataclass(kw_only=True)
class SyntheticConfig:
    out: str  # folder to write (required)
    groups: Count = 8  # objects
    per_group: Count = 5  # views of each object
    seed: Seed = 0


FLAGS = {
    "--out": ("out", "folder to write"),
    "--groups": ("groups", "objects"),
    "--per-group": ("per_group", "views of each object"),
    "--seed": ("seed", "random seed"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> str:
    cfg = parse(SyntheticConfig, argv, FLAGS, __doc__, prog)
    path = generate(cfg.out, cfg.groups, cfg.per_group, cfg.seed)
    print(path, file=report_stream())
    return path


if __name__ == "__main__":
    run_cli(main)
