"""Typed configs: precedence, validation of types / choices / sections / required fields, --print-config."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import pkgutil
import types
import typing

import pytest

from jobs.config import from_dict, parse, set_dotted, to_dict
from jobs.extract import FLAGS
from jobs.index import IndexConfig
from jobs.search import FLAGS as SEARCH_FLAGS
from jobs.search import SearchConfig
from storage.errors import ConfigError, InputError

SEARCH = ["--index", "i", "--queries", "q", "--out", "o"]


def test_precedence_yaml_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("collection: from-yaml\nout: o\nshard_size: 7\ndescribe:\n  local: how\n  gem_p: 2.0\n")
    cfg = parse(
        IndexConfig,
        ["--config", str(y), "--collection", "from-flag", "--set", "describe.gem_p=4", "--set", "stages=[extract]"],
        FLAGS,
    )
    assert cfg.collection == "from-flag" and cfg.shard_size == 7
    assert cfg.describe.local == "how" and cfg.describe.gem_p == 4 and cfg.stages == ["extract"]
    assert cfg.describe.max_side == 1024, "defaults kept"


@pytest.mark.parametrize(
    "args, message",
    [
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
    ],
)
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
    cfg = parse(
        SearchConfig,
        [
            *SEARCH,
            "--set",
            "asmk.params.tau=-0.1",
            "--set",
            "asmk.params.query_ma=3",
            "--center-crop",
            "0.4",
            "--distractors",
            "a,b",
            "--topk",
            "7",
        ],
        SEARCH_FLAGS,
    )
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
    from storage.extraction import settings_digest

    assert settings_digest({}) == "71191749d2e7c0d2"
    assert settings_digest({"describe": {"local": "how"}}) == "349d4d9971dfc90f"
    assert settings_digest({"describe": {"cudnn": True, "device": "cuda", "forward_batch": 16}}) == "71191749d2e7c0d2"
    assert settings_digest({"describe": {"gem_p": 4.0}}) != "71191749d2e7c0d2"


# ------------------------------------------------------------------------------------------
# Ranges: every count at least 1 (or 0 where 0 is documented), every float finite and in range
# ------------------------------------------------------------------------------------------
INDEX = ["--collection", "c", "--out", "o"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topk", "0"], r"^topk: Input should be greater than or equal to 1 \(got 0\)$"),
        (["--topk", "-1"], r"^topk: Input should be greater than or equal to 1 \(got -1\)$"),
        (["--topk", "1000000000000"], r"^topk: Input should be less than or equal to \d+ \(got 1000000000000\)$"),
        (["--center-crop", "0"], r"^center_crop: Input should be greater than 0 \(got 0\)$"),
        (["--center-crop", "1.5"], r"^center_crop: Input should be less than or equal to 1 \(got 1.5\)$"),
        (["--center-crop", "nan"], r"^center_crop: Input should be a finite number"),
        (["--center-crop", "inf"], r"^center_crop: Input should be a finite number"),
        (["--center-crop", "-0.5"], r"^center_crop: Input should be greater than 0 \(got -0.5\)$"),
        (["--set", "center_crop=.nan"], r"^center_crop: Input should be a finite number \(got nan\)$"),
        (["--set", "center_crop=-.inf"], r"^center_crop: Input should be a finite number \(got -inf\)$"),
        (["--set", "fusion_beta=.inf"], r"^fusion_beta: Input should be a finite number"),
        (["--set", "rerank_params.alpha=1"], r"^rerank_params.alpha: Input should be less than 1"),
        (["--set", "rerank_params.sparse_keep=0"], r"^rerank_params.sparse_keep: Input should be greater than 0"),
        (["--set", "asmk.params.tau=1.5"], r"^asmk.params.tau: Input should be less than or equal to 1"),
        (
            ["--set", "ray.actor_resources={extract: .nan}"],
            r"^ray.actor_resources.extract: Input should be a finite number",
        ),
    ],
)
def test_search_out_of_range_values_are_one_line_config_errors(args, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse(SearchConfig, [*SEARCH, *args], SEARCH_FLAGS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("crop, expected", [("1.0", 1.0), ("0.4", 0.4), ("1", 1.0), ("1e-3", 0.001)])
def test_center_crop_in_the_unit_interval_is_accepted(crop, expected):
    assert parse(SearchConfig, [*SEARCH, "--center-crop", crop], SEARCH_FLAGS).center_crop == expected
    assert parse(SearchConfig, SEARCH, SEARCH_FLAGS).center_crop is None  # no crop stays the default


@pytest.mark.parametrize("crop", [0, 0.0, 1.5, -0.5, math.nan, math.inf, -math.inf])
def test_center_crop_out_of_range_is_refused_by_from_dict(crop):
    from jobs.extract import ExtractConfig

    for cls, data in (
        (SearchConfig, {"index": "i", "queries": "q", "out": "o"}),
        (ExtractConfig, {"collection": "c", "out": "o"}),
    ):
        with pytest.raises(ConfigError, match=r"^center_crop: "):
            from_dict(cls, {**data, "center_crop": crop})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("codebook.k", -5, r"^codebook.k: Input should be greater than or equal to 2 \(got -5\)$"),
        ("batch_size", 0, r"^batch_size: Input should be greater than or equal to 1 \(got 0\)$"),
        ("shard_size", 0, r"^shard_size: Input should be greater than or equal to 1 \(got 0\)$"),
        ("graph.k", 0, r"^graph.k: Input should be greater than or equal to 1 \(got 0\)$"),
        ("describe.local_smoothing", 2, r"^describe.local_smoothing: Value error, must be odd"),
        ("describe.global_scales", [], r"^describe.global_scales: List should have at least 1 item"),
        ("describe.local_scales", [1.0, 0.0], r"^describe.local_scales.1: Input should be greater than 0"),
        ("spectral.sparse_keep", 1.01, r"^spectral.sparse_keep: Input should be less than or equal to 1"),
    ],
)
def test_index_out_of_range_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse(IndexConfig, [*INDEX, "--set", f"{key}={value}"], FLAGS)
    data = {"collection": "c", "out": "o"}
    set_dotted(data, key, value)
    with pytest.raises(ConfigError, match=message):
        from_dict(IndexConfig, data)


def test_graph_job_k_zero_is_refused():
    from jobs.graph import FLAGS as GRAPH_FLAGS
    from jobs.graph import GraphJobConfig

    with pytest.raises(ConfigError, match=r"^graph.k: Input should be greater than or equal to 1 \(got 0\)$"):
        parse(GraphJobConfig, ["--index", "i", "--set", "graph.k=0"], GRAPH_FLAGS)


# Int fields where 0 (never a negative) is documented to mean something; every other int is a count (≥ 1).
ZERO_ALLOWED = {
    "id_offset": "ids start at 0",
    "seed": "any non-negative seed",
    "forward_batch": "0: 16 images on GPU, 1 on CPU",
    "local_whiten_dim": "0: no local whitening",
    "nlist": "0: 4·√n IVF lists",
    "ivf_threshold": "0: IVF for every size",
    "rank": "spectral.rank 0 disables the spectral stage",
    "oversample": "0: no extra block vectors",
    "hybrid_iters": "0: the low-rank part of hybrid alone",
    "tasks": "iasmk.tasks 0: 4 per CPU",
    "steps": "gss.steps 0: the untrained network (README)",
    "exact_below": "global_index.exact_below 0: never exact under auto",
    "pca_dim": "global_index.pca_dim 0: chosen from the memory budget",
    "pq_bytes": "global_index.pq_bytes 0: the most that fit the budget",
    "default_nprobe": "global_index.default_nprobe 0: max(16, nlist / 64)",
    "global_nprobe": "0: the approximate index's own nprobe",
    "sources": "distractors params.sources 0: a donor a mosaic cell",
}


def job_configs() -> dict[str, type]:
    """The config dataclass each job of ``jobs.cli.JOBS`` parses, read off its ``main``."""
    from jobs.cli import JOBS

    class Parsed(Exception):
        pass

    def capture(cls, *args, **kwargs):
        raise Parsed(cls)

    found = {}
    for job in JOBS:
        module = importlib.import_module(f"jobs.{job}")
        real, module.parse = module.parse, capture
        try:
            module.main([])
        except Parsed as e:
            found[job] = e.args[0]
        finally:
            module.parse = real
    assert set(found) == set(JOBS), "every job's main parses its config first"
    return found


def _members(typ) -> list:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(typ) if a is not type(None)]
    return [typ]


def config_leaves(cls: type, prefix: str = "", seen: set | None = None):
    """(dotted key, plain type) of every value field under dataclass ``cls``, nested sections walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = [m for m in _members(hints[f.name]) if dataclasses.is_dataclass(m)]
        if sub:
            if seen is not None:
                seen.add(sub[0])
            yield from config_leaves(sub[0], f"{prefix}{f.name}.", seen)
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def required_values(cls: type) -> dict:
    """Plausible values of the required fields of a job config (its defaults fill the rest)."""
    hints = typing.get_type_hints(cls)
    plain = {str: "x", int: 1}
    return {
        f.name: ["x"] if typing.get_origin(hints[f.name]) is list else plain[hints[f.name]]
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def numbers(typ) -> list[tuple[type, typing.Callable]]:
    """(int or float, wrap) for each number a field holds: itself, a list's items or a dict's values."""
    out = []
    for m in _members(typ):
        origin = typing.get_origin(m)
        if origin is list:
            out.append((typing.get_args(m)[0], lambda v: [v]))
        elif origin is dict:
            out.append((typing.get_args(m)[1], lambda v: {"x": v}))
        else:
            out.append((m, lambda v: v))
    return [(t, w) for t, w in out if t in (int, float)]  # bool is not int here: its own type


def refused(cls: type, base: dict, key: str, value) -> str | None:
    """The one-line error of ``key=value`` over the valid ``base``, None when accepted."""
    data = copy.deepcopy(base)
    set_dotted(data, key, value)
    try:
        from_dict(cls, data)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(key) and "\n" not in msg, (key, value, msg)
        return msg
    return None


def test_every_job_config_has_valid_defaults():
    """pydantic does not check defaults: a default outside its own range would pass parse unnoticed."""
    for job, cls in job_configs().items():
        cfg = from_dict(cls, required_values(cls))
        assert from_dict(cls, to_dict(cfg)) == cfg, job


def test_every_number_of_every_job_config_is_range_checked():
    """Walks the type hints of each job's config (nested sections included): every float (also optional, list
    items, dict values) refuses NaN and ±inf; every int refuses −1 and 2**63, and 0 unless ZERO_ALLOWED documents
    what 0 means. A new field without its constraint fails here."""
    problems, checked = [], 0
    for job, cls in job_configs().items():
        base = required_values(cls)
        from_dict(cls, base)  # the base is valid: an error below is the tested value's
        for key, typ in config_leaves(cls):
            for kind, wrap in numbers(typ):
                checked += 1
                bad = [math.nan, math.inf, -math.inf] if kind is float else [-1, 2**63]
                if kind is int and key.split(".")[-1] not in ZERO_ALLOWED:
                    bad.append(0)
                problems += [f"{job}: {key}={v!r} accepted" for v in bad if refused(cls, base, key, wrap(v)) is None]
                if kind is int and key.split(".")[-1] in ZERO_ALLOWED and refused(cls, base, key, wrap(0)) is not None:
                    problems.append(
                        f"{job}: {key}=0 refused although ZERO_ALLOWED says {ZERO_ALLOWED[key.split('.')[-1]]!r}"
                    )
    assert checked > 200, checked  # the walk reached the nested sections
    assert not problems, "\n".join(problems)


def test_the_walk_reaches_every_config_dataclass():
    """Every ``*Config`` / ``*Params`` dataclass of jobs/, operators/ and cluster/ is some job's (section), so the
    range test above covers it."""
    import cluster
    import jobs
    import operators

    defined = set()
    for package in (jobs, operators, cluster):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            defined |= {
                c
                for name, c in vars(module).items()
                if isinstance(c, type)
                and dataclasses.is_dataclass(c)
                and c.__module__ == module.__name__
                and name.endswith(("Config", "Params"))
            }
    reached = set(job_configs().values())
    for cls in list(reached):
        list(config_leaves(cls, seen=reached))
    assert defined - reached == set(), sorted(c.__qualname__ for c in defined - reached)


# -- configs rebuilt from dicts (Ray task arguments, stored JSON) are validated again --------------------------------
def _task_calls():
    from jobs import asmk, discover, distractors, graph, mine, search_rerank, train_reranker

    return {
        "asmk.partial_task": lambda p: asmk.partial_task("unused", {}, 0, True, 1, p),
        "asmk.search_task": lambda p: asmk.search_task([], None, None, None, p, 1, {}, 1),
        "graph.asmk_knn_task": lambda p: graph.asmk_knn_task("unused", {}, 0, 1, 1, p, 1),
        "search_rerank.diffusion_task": lambda p: search_rerank.diffusion_task("u", {}, "dfs", *[None] * 4, 1, p),
        "search_rerank.cas_task": lambda p: search_rerank.cas_task("unused", {}, "cas", *[None] * 4, 1, p),
        "distractors.shard_task": lambda p: distractors.shard_task("unused", {}, None, p, 0, 8, [], {}),
        "discover.centrality_task": lambda p: discover.centrality_task("unused", {}, p),
        "mine.manifold_task": lambda p: mine.manifold_task("unused", {}, "unused", 0, None, (1, 1), p, {}),
        "train_reranker.train_gss_task": lambda p: train_reranker.train_gss_task("unused", {}, p, 1, 1, 1),
        "train_reranker.train_gradnet_task": lambda p: train_reranker.train_gradnet_task("unused", {}, p, 1, 1, 1),
    }


@pytest.mark.parametrize("task", sorted(_task_calls()))
def test_ray_task_bodies_refuse_params_with_an_unknown_key(task):
    """A task's params dict is validated before the task reads anything: one-line ConfigError, not a TypeError."""
    with pytest.raises(ConfigError, match="unknown config key") as e:
        _task_calls()[task]({"old_knob": 1})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [({"lr": math.nan}, "lr"), ({"kq": -1}, "kq"), ({"old_knob": 1}, "unknown config key")],
)
def test_a_stored_learned_models_params_are_refused_in_one_line(change, message):
    from jobs.search_rerank import model_params
    from operators.gss import GssParams

    stored = dataclasses.asdict(GssParams())
    assert model_params(GssParams, "gss", {"params": stored}) == GssParams()
    with pytest.raises(ConfigError, match=message) as e:
        model_params(GssParams, "gss", {"params": {**stored, **change}})
    assert "\n" not in str(e.value) and "stored gss model" in str(e.value)
    with pytest.raises(ConfigError, match="no params"):
        model_params(GssParams, "gss", {})


@pytest.mark.parametrize(
    "key, value, message",
    [("params.alpha", math.nan, "alpha"), ("assign.ef_search", -1, "ef_search"), ("params.old", 1, "unknown")],
)
def test_the_index_stored_asmk_settings_are_validated_by_search(key, value, message):
    from jobs.asmk import AsmkConfig
    from jobs.search_rankings import asmk_config

    def root(settings):
        return types.SimpleNamespace(stage_settings=lambda stage: settings)

    search, stored = types.SimpleNamespace(asmk=None), to_dict(AsmkConfig())
    assert asmk_config(search, root(stored)) == AsmkConfig()
    before_assign = {k: v for k, v in stored.items() if k != "assign"}  # an index built before `assign` existed
    assert asmk_config(search, root(before_assign)) == AsmkConfig()
    bad = copy.deepcopy(stored)
    set_dotted(bad, key, value)
    with pytest.raises(ConfigError, match=message):
        asmk_config(search, root(bad))
