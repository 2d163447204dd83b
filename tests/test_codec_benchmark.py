"""The codec benchmark's derivation (issue 23): targets per seed, costs to target, means, ratios.

Pure functions on synthetic curves, no federation: what the table claims must follow from the
curves by the rules the docs state.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import codec
from pollinate.config import RunConfig
from pollinate.server.curves import cumulative


def curve(accuracies: list[float], up: int, down: int, clients: int = 2) -> list[dict]:
    """Rounds 0..R as summary.json has them: per-round totals over ``clients`` sampled clients."""
    return cumulative([{"round": i, "accuracy": a, "seconds": 10.0 * bool(i), "sampled": clients * bool(i),
                        "bytes_up": up * clients * bool(i), "bytes_down": down * clients * bool(i)}
                       for i, a in enumerate(accuracies)])


def raw(setting: str, seeds: dict[int, list[dict]], dataset: str = "sst2") -> dict:
    return {"dataset": dataset, "setting": setting, "uplink": setting, "downlink": setting, "seeds": seeds,
            "minutes": 0.0}


def test_targets_are_per_seed_shares_of_fp32_and_costs_are_cumulative_per_client():
    # fp32: seed 0 ends at 0.80 (target 0.776, reached in round 2), seed 1 at 0.90 (target 0.873, round 3)
    fp32 = raw("fp32", {0: curve([0.5, 0.7, 0.78, 0.80], 1000, 1000),
                        1: curve([0.5, 0.6, 0.8, 0.90], 1000, 1000)})
    # compressed: seed 0 reaches 0.776 in round 3, seed 1 reaches 0.873 in round 3
    small = raw("default", {0: curve([0.5, 0.6, 0.7, 0.79], 20, 40),
                            1: curve([0.5, 0.6, 0.8, 0.88], 20, 40)})
    fp32_row, small_row = codec.derive([fp32, small])

    assert [s["target"] for s in small_row["seeds"]] == pytest.approx([0.97 * 0.80, 0.97 * 0.90])
    assert fp32_row["rounds_to_target"] == pytest.approx(2.5)  # rounds 2 and 3
    assert small_row["rounds_to_target"] == 3 and small_row["fp32_rounds_to_target"] == pytest.approx(2.5)
    assert small_row["rounds_ratio"] == pytest.approx(3 / 2.5)
    # bytes per client, cumulative to the round reached, mean over seeds
    assert fp32_row["bytes_to_target_up"] == pytest.approx((2000 + 3000) / 2)
    assert small_row["bytes_to_target_up"] == 60 and small_row["bytes_to_target_down"] == 120
    assert small_row["ratio_to_target_up"] == pytest.approx(2500 / 60)
    assert small_row["ratio_to_target_down"] == pytest.approx(2500 / 120)
    assert small_row["seconds_to_target"] == 30.0
    assert (small_row["bytes_up"], small_row["bytes_down"]) == (20, 40)  # per client per round
    assert small_row["ratio_up"] == 50 and small_row["ratio_down"] == 25
    assert small_row["accuracy"] == pytest.approx(0.835)
    assert small_row["accuracy_sd"] == pytest.approx(0.0636396, rel=1e-5)
    assert small_row["vs_fp32"] == pytest.approx(100 * (0.835 - 0.85))
    assert small_row["curve"]["accuracy"] == pytest.approx([0.5, 0.6, 0.75, 0.835])
    assert small_row["curve"]["accuracy_per_seed"][1] == [0.5, 0.6, 0.8, 0.88]
    # 1.2x the rounds and 1.5 points lost: both goals missed, the bytes one met
    assert small_row["targets"] == "missed: rounds, accuracy"
    assert fp32_row["targets"] == "" and fp32_row["ratio_to_target_up"] == 1


def test_a_seed_that_never_reaches_the_target_leaves_the_means_empty():
    fp32 = raw("fp32", {0: curve([0.5, 0.9], 1000, 1000), 1: curve([0.5, 0.9], 1000, 1000)})
    lossy = raw("topk-ternary@0.1/topk-ternary@0.1", {0: curve([0.5, 0.88], 10, 10),
                                                       1: curve([0.5, 0.80], 10, 10)})
    row = codec.derive([fp32, lossy])[1]
    assert row["reached"] == "1/2" and row["seeds"][1]["to_target"] is None
    assert row["rounds_to_target"] is None and row["bytes_to_target_up"] is None
    assert row["ratio_to_target_up"] is None
    assert row["targets"] == "missed: rounds, accuracy, bytes"


@pytest.mark.parametrize(("down", "expected"), [(40, "all (20x)"), (10, "all (50x)")])
def test_goals_met_in_rounds_accuracy_and_bytes(down, expected):
    fp32 = raw("fp32", {0: curve([0.5, 0.9, 0.9], 1000, 1000)})
    good = raw("default", {0: curve([0.5, 0.9, 0.898], 10, down)}, )
    assert codec.derive([fp32, good])[1]["targets"] == expected


def test_targets_are_per_dataset():
    rows = codec.derive([raw("fp32", {0: curve([0.5, 0.9], 100, 100)}, "sst2"),
                         raw("fp32", {0: curve([0.1, 0.5], 100, 100)}, "banking77"),
                         raw("default", {0: curve([0.1, 0.49], 10, 10)}, "banking77")])
    assert rows[2]["target_accuracy"] == pytest.approx(0.97 * 0.5) and rows[2]["rounds_to_target"] == 1


def test_settings_parse_to_codec_pairs():
    defaults = RunConfig()
    default = codec.Wire.parse("default")
    assert default.uplink == codec.Setting.of(defaults.codec, defaults.density)
    assert default.downlink == codec.Setting.of(defaults.downlink_codec, defaults.downlink_density)
    assert default.head == defaults.head_codec
    headed = codec.Wire.parse("topk-int8@0.1/topk-ternary@0.1/int4-row")
    assert headed.name == "topk-int8@0.1/topk-ternary@0.1/int4-row" and headed.head == "int4-row"
    with pytest.raises(SystemExit, match="must be dense"):
        codec.Wire.parse("sign/sign/topk-int8@0.1")
    assert codec.Wire.parse("flower").uplink is None
    pair = codec.Wire.parse("topk-int8@0.1/fp32")
    assert pair.name == "topk-int8@0.1/fp32" and pair.downlink == codec.Setting("fp32")
    assert codec.Wire.parse("int8").downlink == default.downlink
    with pytest.raises(SystemExit, match="top-k encodings need"):
        codec.Wire.parse("topk-int8/fp32")


@pytest.mark.parametrize(("recipe", "name", "says"), [
    ("pinned", "codec", "no restricted softmax"), ("defaults", "codec-defaults", "restricted softmax on")])
def test_rows_publish_with_curves_plot_and_notes(tmp_path, recipe, name, says):
    """What a full run hands to publishing: the JSON (curves, per-seed numbers), the plot, the docs block;
    under the training defaults (``--recipe defaults``) beside the pinned table, not over it."""
    import argparse
    import json

    rows = codec.derive([raw("fp32", {0: curve([0.5, 0.8, 0.9], 1000, 1000)}),
                         raw("flower", {0: curve([0.5, 0.7, 0.9], 1100, 1100)}),
                         raw("default", {0: curve([0.5, 0.8, 0.898], 10, 20)})])
    args = argparse.Namespace(no_publish=False, results=tmp_path, datasets="sst2", seeds="0", rounds=2,
                              clients=2, max_train_examples=40, test_examples=100, local_epochs=1,
                              batch_size=32, learning_rate=5e-3, repeats=3, recipe=recipe)
    codec.publish(args, rows)
    assert [p.name for p in tmp_path.glob("*.json")] == [f"{name}.json"]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert [r["setting"] for r in record["rows"]] == ["fp32", "flower", "default"]
    assert "curve" not in record["rows"][0] and record["curves"]["sst2/default"]["accuracy"][-1] == 0.898
    assert record["per_seed"]["sst2/default"][0]["to_target"]["rounds"] == 2
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "A reduced run" in docs and "sst2: rounds to target 2 vs fp32 2" in docs and says in docs
    assert f"<!-- {name}:start -->" in docs


def test_the_defaults_recipe_trains_as_the_run_config_defaults_and_pinned_as_before(tmp_path):
    """``--recipe pinned`` keeps the recipe the published table was measured under (no restricted
    softmax); ``defaults`` leaves training to the run-config defaults (a different cached run)."""
    import argparse

    args = argparse.Namespace(rounds=12, clients=10, max_train_examples=300, test_examples=1000,
                              batch_size=32, learning_rate=5e-3, local_epochs=1, seed=0, runs=str(tmp_path))
    wire = codec.Wire.parse("default")
    pinned = codec.run_config(argparse.Namespace(**vars(args), recipe="pinned"), "sst2", 0, wire)
    defaults = codec.run_config(argparse.Namespace(**vars(args), recipe="defaults"), "sst2", 0, wire)
    assert pinned.restricted_softmax == 1.0 and defaults.restricted_softmax == RunConfig().restricted_softmax
    assert pinned.out != defaults.out


def test_a_row_with_fewer_seeds_is_compared_with_fp32_on_its_own_seeds():
    """``--cached-only`` rows may hold fewer seeds than fp32: vs_fp32 and the ratios then use fp32's
    runs on the same seeds, not its mean over seeds the row never ran."""
    rows = codec.derive([raw("fp32", {0: curve([0.5, 0.8, 0.9], 1000, 1000),
                                      1: curve([0.5, 0.6, 0.7], 1000, 1000)}),
                         raw("sign/sign", {0: curve([0.5, 0.8, 0.89], 40, 40)})])
    row = rows[1]
    assert row["seed_count"] == 1 and row["vs_fp32"] == pytest.approx(-1.0)
    assert row["ratio_to_target_up"] == pytest.approx(25.0)


def test_cache_keys_survive_added_options_and_resolve_auto_values(tmp_path):
    """A run cached before an option existed keeps its key (the option at its added value is left
    out); a run at ``auto`` is the run at what auto resolves to; any real difference is a new key."""
    from benchmarks import harness

    def key(config: RunConfig) -> str:
        return harness.keyed_out(config, str(tmp_path), "run").out

    before = RunConfig(restricted_softmax=1.0, head_codec="")
    saved = {k: v for k, v in json.loads(before.to_json()).items() if k not in harness.ADDED_OPTIONS}
    assert harness.same_run(saved, before)  # an old summary, which never saved the added options
    assert key(before) == key(RunConfig.from_mapping({**harness.ADDED_OPTIONS, **saved}))
    assert key(RunConfig()) == key(RunConfig(restricted_softmax=0.0))  # auto = 0 for classification
    assert key(RunConfig()) != key(RunConfig(restricted_softmax=1.0))
    assert key(RunConfig(dp="sample")) == key(RunConfig(dp="sample", restricted_softmax=1.0))
