"""Typed configs: precedence, validation of types / choices / sections / required fields, --print-config."""
from __future__ import annotations

import pytest

from jobs.config import parse
from jobs.extract import FLAGS
from jobs.index import IndexConfig
from jobs.search import FLAGS as SEARCH_FLAGS, SearchConfig
from storage.errors import ConfigError, InputError

SEARCH = ["--index", "i", "--queries", "q", "--out", "o"]


def test_precedence_yaml_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("collection: from-yaml\nout: o\nshard_size: 7\ndescribe:\n  local: how\n  gem_p: 2.0\n")
    cfg = parse(IndexConfig, ["--config", str(y), "--collection", "from-flag", "--set", "describe.gem_p=4",
                              "--set", "stages=[extract]"], FLAGS)
    assert cfg.collection == "from-flag" and cfg.shard_size == 7
    assert cfg.describe.local == "how" and cfg.describe.gem_p == 4 and cfg.stages == ["extract"]
    assert cfg.describe.max_side == 1024, "defaults kept"


@pytest.mark.parametrize("args, message", [
    (["--set", "rerank_params.kqq=3"], r"unknown config key\(s\) \[.rerank_params.kqq.\]"),
    (["--set", "topk=abc"], r"topk: Input should be a valid integer"),
    (["--topk", "abc"], r"topk: Input should be a valid integer"),
    (["--set", "ray=5"], r"ray: Input should be a dictionary or an instance of RayConfig"),
    (["--set", "asmk.params.binary=maybe"], r"asmk.params.binary: Input should be a valid boolean"),
    (["--method", "fuzed"], r"method: Input should be 'global', 'asmk', 'fused', 'iasmk', 'fused-iasmk' or 'os'"),
    (["--rerank", "diffusion"], r"rerank: Input should be 'none', 'aqe'"),
    (["--set", "rerank_params.dtype=float16"], r"rerank_params.dtype: Input should be 'float32' or 'float64'"),
    (["--set", "topk.x=3"], r"topk: Input should be a valid integer"),
    (["--set", "topk"], r"--set expects KEY=VALUE"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
])
def test_search_config_mistakes_are_one_line_config_errors(args, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse(SearchConfig, [*SEARCH, *args], SEARCH_FLAGS)
    assert isinstance(e.value, InputError) and "\n" not in str(e.value)


def test_required_fields_and_choices_of_nested_operator_configs():
    with pytest.raises(ConfigError, match=r"queries: Field required"):
        parse(SearchConfig, ["--index", "i", "--out", "o"], SEARCH_FLAGS)
    with pytest.raises(ConfigError, match=r"describe.local: Input should be 'rootsift', 'how' or 'none'"):
        parse(IndexConfig, ["--collection", "c", "--out", "o", "--set", "describe.local=sift"], FLAGS)
    with pytest.raises(ConfigError, match=r"stages.0: Input should be 'extract'"):
        parse(IndexConfig, ["--collection", "c", "--out", "o", "--set", "stages=[extrakt]"], FLAGS)


def test_optional_nested_config_and_flag_types():
    cfg = parse(SearchConfig, [*SEARCH, "--set", "asmk.params.tau=-0.1", "--set", "asmk.params.query_ma=3",
                               "--center-crop", "0.4", "--distractors", "a,b", "--topk", "7"], SEARCH_FLAGS)
    assert cfg.asmk.params.tau == -0.1 and cfg.asmk.params.query_ma == 3 and cfg.asmk.params.binary
    assert cfg.center_crop == 0.4 and cfg.distractors == ["a", "b"] and cfg.topk == 7
    assert parse(SearchConfig, SEARCH, SEARCH_FLAGS).asmk is None
    assert parse(SearchConfig, ["--index", "123", "--queries", "q", "--out", "o"], SEARCH_FLAGS).index == "123"


def test_print_config_prints_the_resolved_yaml(capsys):
    import yaml

    with pytest.raises(SystemExit) as e:
        parse(SearchConfig, [*SEARCH, "--topk", "9", "--set", "rerank_params.kq=4", "--print-config"], SEARCH_FLAGS)
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["topk"] == 9 and printed["rerank_params"]["kq"] == 4 and printed["method"] == "global"


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse(SearchConfig, ["--help"], SEARCH_FLAGS, "Search job.\n\nTwo paragraphs kept.")
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 'global'; one of global, asmk, fused" in out
    assert "one of none, aqe, alpha-qe, dfs, truncated-dfs, fsr, hybrid" in out
    assert "(required)" in out and "Two paragraphs kept." in out


def test_bad_yaml_file_is_a_config_error(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a YAML mapping"):
        parse(SearchConfig, [*SEARCH, "--config", str(y)], SEARCH_FLAGS)
    with pytest.raises(ConfigError, match="FileNotFoundError"):
        parse(SearchConfig, [*SEARCH, "--config", str(tmp_path / "missing.yaml")], SEARCH_FLAGS)


def test_extraction_digest_of_existing_roots_is_stable_and_ignores_execution_settings():
    """Roots built before keep resuming: the digest of the default and the HOW extraction settings is the one
    their shards record (pinned), and device, batching and cuDNN (how, not what, is computed) leave it alone."""
    from jobs.extract import settings_digest

    assert settings_digest({}) == "71191749d2e7c0d2"
    assert settings_digest({"describe": {"local": "how"}}) == "349d4d9971dfc90f"
    assert settings_digest({"describe": {"cudnn": True, "device": "cuda", "forward_batch": 16}}) == "71191749d2e7c0d2"
    assert settings_digest({"describe": {"gem_p": 4.0}}) != "71191749d2e7c0d2"
