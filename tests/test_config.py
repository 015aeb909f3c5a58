"""KVCompressConfig: construction, (de)serialisation, every validation error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_kvcompress.config import BUDGET_UNITS, POLICY_NAMES, SCHEDULE_NAMES, ConfigError, KVCompressConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _err(**kw) -> str:
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig(**kw)
    msg = str(ei.value)
    assert "\n" not in msg
    assert isinstance(ei.value, ValueError)
    return msg


def test_defaults_disabled():
    c = KVCompressConfig()
    assert c.policy == "none" and not c.enabled and c.keeps_all
    assert c.budget == 1.0 and c.compress_interval == 32 and c.min_layer_budget == 64
    assert c.resolved_schedule == "uniform"


@pytest.mark.parametrize(
    "policy,schedule,sinks",
    [("h2o", "uniform", 0), ("pyramid", "pyramidinfer-cosine", 4), ("snapkv", "pyramidkv", 0), ("streaming", "uniform", 4)],
)
def test_policy_defaults(policy, schedule, sinks):
    c = KVCompressConfig(policy=policy, budget=0.25)
    assert c.enabled and not c.keeps_all and c.budget_is_fraction
    assert c.resolved_schedule == schedule
    assert c.resolved_sinks == sinks


def test_fixed_recent():
    assert KVCompressConfig(policy="snapkv", budget=0.5).fixed_recent == 32
    assert KVCompressConfig(policy="snapkv", budget=0.5, snapkv_window=16).fixed_recent == 16
    assert KVCompressConfig(policy="h2o", budget=0.5).fixed_recent is None
    assert KVCompressConfig(policy="h2o", budget=0.5, recent_window=10).fixed_recent == 10
    assert KVCompressConfig(policy="pyramid", budget=0.5).fixed_recent == 32  # the observation window
    assert KVCompressConfig(policy="pyramid", budget=0.5, pyramid_window=0).fixed_recent is None  # reference ratio


def test_budget_kinds():
    assert KVCompressConfig(policy="h2o", budget=1).keeps_all
    assert KVCompressConfig(policy="h2o", budget=1.0).keeps_all
    c = KVCompressConfig(policy="h2o", budget=256.0)
    assert c.budget == 256 and isinstance(c.budget, int) and not c.keeps_all
    assert c.prompt_budget(1000) == 256
    f = KVCompressConfig(policy="h2o", budget=0.25)
    assert f.prompt_budget(1000) == 250
    assert f.prompt_budget(1001) == 251  # ceil
    assert KVCompressConfig(policy="h2o", budget=0.1).prompt_budget(30) == 3  # 0.1*30 is 3.0000000000000004


def test_roundtrip_dict_json():
    c = KVCompressConfig(policy="snapkv", budget=512, snapkv_window=16, schedule="pyramidkv")
    d = c.to_dict()
    assert KVCompressConfig.from_dict(d) == c
    assert KVCompressConfig.from_json(json.dumps(d)) == c
    assert KVCompressConfig.from_json(c.to_json()) == c
    assert KVCompressConfig.from_dict({"kv_compress": {"policy": "h2o", "budget": 0.2}}) == KVCompressConfig(
        policy="h2o", budget=0.2
    )
    assert KVCompressConfig.from_dict(None) == KVCompressConfig()


def test_case_and_float_ints_normalised():
    c = KVCompressConfig.from_dict({"policy": "H2O", "budget": 0.3, "compress_interval": 16.0, "sinks": 2.0})
    assert c.policy == "h2o" and c.compress_interval == 16 and isinstance(c.compress_interval, int) and c.sinks == 2


@pytest.mark.parametrize("name", ["pyramid.yaml", "h2o-20pct.yaml", "snapkv.yaml", "streaming.yaml"])
def test_presets_load(name):
    c = KVCompressConfig.from_yaml(CONFIGS / name)
    assert c.enabled
    assert c.policy in POLICY_NAMES
    assert c.resolved_schedule in SCHEDULE_NAMES


def test_preset_values():
    assert KVCompressConfig.from_yaml(CONFIGS / "h2o-20pct.yaml").budget == 0.2
    p = KVCompressConfig.from_yaml(CONFIGS / "pyramid.yaml")
    assert p.policy == "pyramid" and p.resolved_schedule == "pyramidinfer-cosine"


# ----------------------------------------------------------------------------- errors
def test_unknown_policy_message():
    assert _err(policy="foo") == (
        "kv_compress.policy: unknown policy 'foo'; allowed: none, h2o, pyramid, snapkv, streaming"
    )


def test_unknown_schedule_message():
    msg = _err(policy="h2o", budget=0.5, schedule="zigzag")
    assert msg.startswith("kv_compress.schedule: unknown schedule 'zigzag'; allowed: ")
    for s in SCHEDULE_NAMES:
        assert s in msg


def test_unknown_pooling():
    msg = _err(policy="snapkv", budget=0.5, snapkv_pooling="median")
    assert msg.startswith("kv_compress.snapkv_pooling:") and "avg, max" in msg
    msg = _err(policy="pyramid", budget=0.5, pool_tiebreak="oldest")
    assert msg.startswith("kv_compress.pool_tiebreak:") and "newest, score" in msg
    assert _err(policy="pyramid", budget=0.5, pool_min_spans=-1).startswith("kv_compress.pool_min_spans: must be an integer >= 0")


def test_unknown_key():
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_dict({"policy": "h2o", "kv_budget": 0.5})
    msg = str(ei.value)
    assert msg.startswith("kv_compress.kv_budget: unknown option; allowed: policy, budget,") and "\n" not in msg


@pytest.mark.parametrize("budget", [0, -0.5, -3])
def test_budget_not_positive(budget):
    msg = _err(policy="h2o", budget=budget)
    assert msg.startswith("kv_compress.budget: must be > 0")


def test_budget_non_integer_tokens():
    msg = _err(policy="h2o", budget=100.5)
    assert msg == f"kv_compress.budget: 100.5 is neither a fraction below 1 nor a whole number of tokens; the budget is {BUDGET_UNITS}"


def test_budget_whole_number_float_is_tokens():
    """``2.0`` is 2 tokens (refused below min_layer_budget), and the message says fractions lie in (0, 1)."""
    assert KVCompressConfig(policy="h2o", budget=128.0).budget == 128
    msg = _err(policy="h2o", budget=2.0)
    assert msg.startswith("kv_compress.budget: 2 tokens is below min_layer_budget (64)")
    assert "a fraction of the prompt in (0, 1)" in msg


@pytest.mark.parametrize("kw", [dict(budget="0.5"), dict(budget=0), dict(budget=-3), dict(budget=2.5), dict(budget=2.0),
                                dict(budget=40, snapkv_window=32, sinks=16, min_layer_budget=8, policy="snapkv")])
def test_budget_errors_share_one_wording(kw):
    """Every unit error of the budget ends with the same sentence as the --kv-budget help."""
    kw = {"policy": "h2o", **kw}
    assert _err(**kw).endswith(f"; the budget is {BUDGET_UNITS}")
    assert "(0, 1)" in BUDGET_UNITS and ">= min_layer_budget (default 64)" in BUDGET_UNITS


def test_yaml_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("kv_compress:\n  policy: h2o  # r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_yaml(bad)
    msg = str(ei.value)
    assert msg == (f"kv_compress: {str(bad)!r} is not UTF-8 text (byte 0xe9 at offset 31); "
                   "expected a UTF-8 YAML file with a kv_compress mapping")


@pytest.mark.parametrize("budget", ["0.5", None, True, float("nan"), float("inf")])
def test_budget_not_number(budget):
    assert _err(policy="h2o", budget=budget).startswith("kv_compress.budget: must be a number")


def test_budget_with_policy_none():
    assert _err(policy="none", budget=0.5).startswith("kv_compress.budget: policy 'none' keeps everything")


def test_budget_below_sinks_plus_recent():
    msg = _err(policy="snapkv", budget=40, snapkv_window=32, sinks=16, min_layer_budget=8)
    assert msg == ("kv_compress.budget: 40 tokens is less than sinks + recent_window = 16 + 32 for policy 'snapkv'"
                   f"; the budget is {BUDGET_UNITS}")
    msg = _err(policy="h2o", budget=100, recent_window=90, sinks=20)
    assert msg.startswith("kv_compress.budget: 100 tokens is less than sinks + recent_window = 20 + 90")
    # a fraction cannot be checked before the prompt is known
    KVCompressConfig(policy="h2o", budget=0.1, recent_window=90, sinks=20)


def test_budget_below_min_layer_budget():
    msg = _err(policy="h2o", budget=32)
    assert msg.startswith("kv_compress.budget: 32 tokens is below min_layer_budget (64)")
    KVCompressConfig(policy="h2o", budget=32, min_layer_budget=16)


@pytest.mark.parametrize("name", ["recent_window", "sinks"])
def test_negative_windows(name):
    assert _err(policy="h2o", budget=0.5, **{name: -1}) == f"kv_compress.{name}: must be >= 0 or null (policy default), got -1"


@pytest.mark.parametrize("name", ["compress_interval", "min_layer_budget", "num_stages", "snapkv_window", "h2o_window",
                                  "prefill_drop_from"])
def test_sizes_at_least_one(name):
    assert _err(policy="h2o", budget=0.5, **{name: 0}) == f"kv_compress.{name}: must be an integer >= 1, got 0"
    assert _err(policy="h2o", budget=0.5, **{name: -4}).startswith(f"kv_compress.{name}: must be an integer >= 1")


@pytest.mark.parametrize("name", ["compress_interval", "sinks", "num_stages"])
def test_non_integer_sizes(name):
    assert _err(policy="h2o", budget=0.5, **{name: 2.5}) == f"kv_compress.{name}: must be an integer, got 2.5"
    assert _err(policy="h2o", budget=0.5, **{name: "8"}).startswith(f"kv_compress.{name}: must be an integer")


def test_prefill_drop_from_needs_prefill_drop():
    assert _err(policy="pyramid", budget=0.25, prefill_drop_from=10) == (
        "kv_compress.prefill_drop_from: only with prefill_drop: true (--kv-prefill-drop), got 10")
    assert KVCompressConfig(policy="pyramid", budget=0.25, prefill_drop=True, prefill_drop_from=10).prefill_drop_from == 10


def test_snapkv_kernel_odd():
    assert _err(policy="snapkv", budget=0.5, snapkv_kernel=4) == "kv_compress.snapkv_kernel: must be an odd integer >= 1, got 4"
    assert _err(policy="pyramid", budget=0.5, pyramid_kernel=0) == "kv_compress.pyramid_kernel: must be an odd integer >= 1, got 0"
    assert _err(policy="h2o", budget=0.5, h2o_kernel=2) == "kv_compress.h2o_kernel: must be an odd integer >= 1, got 2"


def test_retrieval_options_refused_in_one_line():
    assert _err(policy="pyramid", budget=0.5, pyramid_window=-1) == \
        "kv_compress.pyramid_window: must be an integer >= 0 (0 = obs_window_ratio of the context), got -1"
    assert _err(policy="h2o", budget=0.5, h2o_window_weight=-0.5) == \
        "kv_compress.h2o_window_weight: must be >= 0 (0 = reference H2O), got -0.5"
    assert _err(policy="h2o", budget=0.5, h2o_window_weight="big") == "kv_compress.h2o_window_weight: must be a number, got 'big'"
    assert _err(policy="snapkv", budget=0.5, last_query_weight=-1) == \
        "kv_compress.last_query_weight: must be >= 0 (0 = the references' vote), got -1"
    assert _err(policy="pyramid", budget=0.5, last_query_weight="x") == "kv_compress.last_query_weight: must be a number, got 'x'"
    assert _err(policy="snapkv", budget=0.5, reset_scores="yes") == "kv_compress.reset_scores: must be true or false, got 'yes'"
    assert _err(policy="snapkv", budget=0.5, decode_evict=0) == "kv_compress.decode_evict: must be true or false, got 0"
    assert KVCompressConfig(policy="snapkv", budget=0.5, decode_evict=False).grow_from(900) == 900
    assert KVCompressConfig(policy="snapkv", budget=0.5).grow_from(900) is None
    cfg = KVCompressConfig(policy="h2o", budget=0.5, h2o_window_weight=0, pyramid_window=0, reset_scores=True)
    assert (cfg.h2o_window_weight, cfg.pyramid_window, cfg.reset_scores) == (0, 0, True)


@pytest.mark.parametrize("v", [0, 1.5, -0.1])
def test_obs_window_ratio_range(v):
    assert _err(policy="pyramid", budget=0.5, obs_window_ratio=v).startswith("kv_compress.obs_window_ratio: must be in (0, 1]")


def test_beta_at_least_one():
    assert _err(policy="snapkv", budget=0.5, pyramidkv_beta=0.5).startswith("kv_compress.pyramidkv_beta: must be >= 1")


def test_floor_ratio():
    assert _err(policy="pyramid", budget=0.5, floor_ratio=0).startswith("kv_compress.floor_ratio: must be in (0, 1]")
    assert _err(policy="pyramid", budget=0.5, floor_ratio=1.5).startswith("kv_compress.floor_ratio: must be in (0, 1]")
    msg = _err(policy="h2o", budget=0.5, floor_ratio=0.8)
    assert msg.startswith("kv_compress.floor_ratio: only used by schedules pyramidinfer-cosine, pyramidinfer-linear")
    assert KVCompressConfig(policy="h2o", budget=0.5, schedule="pyramidinfer-linear", floor_ratio=0.8).resolved_floor_ratio == 0.8
    assert KVCompressConfig(policy="pyramid", budget=0.5).resolved_floor_ratio == 0.9


def test_bad_json_and_yaml(tmp_path):
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_json("{policy: h2o")
    assert str(ei.value).startswith("kv_compress: invalid JSON") and "\n" not in str(ei.value)
    p = tmp_path / "bad.yaml"
    p.write_text("policy: [h2o\nbudget: 0.2\n")
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_yaml(p)
    assert str(ei.value).startswith("kv_compress: invalid YAML") and "\n" not in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_yaml(tmp_path / "missing.yaml")
    assert str(ei.value).startswith("kv_compress: cannot read")
    with pytest.raises(ConfigError) as ei:
        KVCompressConfig.from_json("[1, 2]")
    assert str(ei.value) == "kv_compress: expected a mapping of options, got list"


def test_frozen():
    c = KVCompressConfig(policy="h2o", budget=0.5)
    with pytest.raises(Exception):
        c.budget = 0.3  # type: ignore[misc]


def test_no_vllm_import():
    import ast

    root = Path(__file__).resolve().parents[1] / "vllm_kvcompress"
    files = [root / "config.py", root / "oracle.py", *sorted((root / "policies").glob("*.py"))]
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n == "vllm" or n.startswith("vllm.") for n in names), f"{f.name} imports vllm"


# ---------------------------------------------------------------- per-request kv_budget
from vllm_kvcompress.config import request_budget  # noqa: E402


@pytest.mark.parametrize("server,value,want", [
    ({"policy": "pyramid", "budget": 512}, 256, 256),
    ({"policy": "pyramid", "budget": 512}, 256.0, 256),
    ({"policy": "pyramid", "budget": 512}, "128", 128),
    ({"policy": "pyramid", "budget": 0.25}, 0.1, 0.1),
    ({"policy": "pyramid", "budget": 0.25}, 4096, 4096),  # mixed units: the smaller applies per layer
    ({"policy": "h2o", "budget": 1.0}, 300, 300),  # the server keeps all: any lower budget
])
def test_request_budget_accepts(server, value, want):
    got = request_budget(KVCompressConfig.from_dict(server), value, block_size=32)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("server,value,needle", [
    ({"policy": "none"}, 256, "without KV compression"),
    ({"policy": "pyramid", "budget": 512}, 1024, "above the server's budget"),
    ({"policy": "pyramid", "budget": 0.25}, 0.5, "above the server's budget"),
    ({"policy": "pyramid", "budget": 512}, 16, "below the page size"),
    ({"policy": "pyramid", "budget": 512}, 40, "min_layer_budget"),
    ({"policy": "pyramid", "budget": 512}, 100.5, "neither a fraction below 1 nor a whole number"),
    ({"policy": "pyramid", "budget": 512}, 0, "> 0"),
    ({"policy": "pyramid", "budget": 512}, -3, "> 0"),
    ({"policy": "pyramid", "budget": 512}, 1, "keep everything"),
    ({"policy": "pyramid", "budget": 512}, "lots", "must be a number"),
    ({"policy": "pyramid", "budget": 512}, True, "must be a number"),
    ({"policy": "pyramid", "budget": 512}, [1], "must be a number"),
    ({"policy": "pyramid", "budget": 512}, float("nan"), "must be a number"),
])
def test_request_budget_refuses_in_one_line(server, value, needle):
    with pytest.raises(ConfigError) as e:
        request_budget(KVCompressConfig.from_dict(server), value, block_size=32)
    msg = str(e.value)
    assert msg.startswith("kv_budget: ") and needle in msg and "\n" not in msg, msg


def test_prefill_drop_only_with_pyramid():
    assert KVCompressConfig(policy="pyramid", budget=0.25, prefill_drop=True).prefill_drop
    assert _err(policy="h2o", budget=0.25, prefill_drop=True) == (
        "kv_compress.prefill_drop: only with policy 'pyramid' (the PyramidInfer reference), got policy 'h2o'")
    assert _err(policy="pyramid", budget=0.25, prefill_drop="yes").startswith(
        "kv_compress.prefill_drop: must be true or false")


def test_variant_settings():
    from vllm_kvcompress.config import variant_settings

    assert variant_settings("h2o") == {"policy": "h2o"}
    assert variant_settings("pyramid+drop") == {"policy": "pyramid", "prefill_drop": True}
    assert variant_settings("pyramid+drop@10") == {"policy": "pyramid", "prefill_drop": True, "prefill_drop_from": 10}
    for bad in ("snapkv+drop", "pyramid+drop@x", "pyramid+foo", "none", "nonsense"):
        with pytest.raises(ValueError, match="allowed: h2o, pyramid, snapkv, streaming, pyramid\\+drop"):
            variant_settings(bad)


def test_prefix_hit_option():
    assert KVCompressConfig(policy="pyramid", budget=0.25).prefix_hit == "compress"
    assert not KVCompressConfig(policy="pyramid", budget=0.25).keeps_prefix_hits
    assert KVCompressConfig(policy="pyramid", budget=0.25, prefix_hit="keep").keeps_prefix_hits
    # nothing to keep where a prompt is compacted per chunk (no sharing) or nothing is evicted
    assert not KVCompressConfig(policy="pyramid", budget=0.25, prefix_hit="keep",
                                prompt_compaction="per-chunk").keeps_prefix_hits
    assert not KVCompressConfig(policy="none", prefix_hit="keep").keeps_prefix_hits
    msg = _err(policy="h2o", budget=0.25, prefix_hit="share")
    assert "prefix_hit" in msg and "compress" in msg and "keep" in msg
