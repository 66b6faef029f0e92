from __future__ import annotations

import pytest

from jobs.index import IndexConfig
from jobs.index import main as index_main  # noqa: F401 - the entry point imports
from jobs.config import parse
from jobs.extract import FLAGS


def test_precedence_yaml_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("collection: from-yaml\nout: o\nshard_size: 7\ndescribe:\n  local: how\n  gem_p: 2.0\n")
    cfg = parse(IndexConfig, ["--config", str(y), "--collection", "from-flag", "--set", "describe.gem_p=4",
                              "--set", "stages=[extract]"], FLAGS)
    assert cfg.collection == "from-flag" and cfg.shard_size == 7
    assert cfg.describe.local == "how" and cfg.describe.gem_p == 4 and cfg.stages == ["extract"]
    assert cfg.describe.max_side == 1024, "defaults kept"


def test_unknown_key_is_an_error():
    with pytest.raises(SystemExit):
        parse(IndexConfig, ["--set", "describe.gem_pp=3"], FLAGS)


def test_optional_nested_config():
    from jobs.search import FLAGS as SEARCH_FLAGS, SearchConfig

    cfg = parse(SearchConfig, ["--set", "asmk.params.tau=-0.1", "--set", "asmk.params.query_ma=3"], SEARCH_FLAGS)
    assert cfg.asmk.params.tau == -0.1 and cfg.asmk.params.query_ma == 3 and cfg.asmk.params.binary
    assert parse(SearchConfig, [], SEARCH_FLAGS).asmk is None
