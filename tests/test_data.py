from collections import Counter

import pytest

from pollinate import data as datalib
from pollinate.config import ConfigError, RunConfig


def _labels_per_client(config, table, n):
    return [set(datalib.client_table(config, table, i, n)["label"]) for i in range(n)]


def test_k_classes_per_client_holds_exactly_k_labels():
    config = RunConfig(partition="classes", classes_per_client=2)
    table = datalib.generated_classification(800, seed=1)
    for labels in _labels_per_client(config, table, 6):
        assert len(labels) == 2


def test_dirichlet_is_skewed_and_iid_is_not():
    table = datalib.generated_classification(2000, seed=2)

    def max_share(config):
        shares = []
        for i in range(5):
            counts = Counter(datalib.client_table(config, table, i, 5)["label"])
            shares.append(max(counts.values()) / sum(counts.values()))
        return sum(shares) / len(shares)

    assert max_share(RunConfig(partition="dirichlet", dirichlet_alpha=0.1)) > 0.5
    assert max_share(RunConfig(partition="iid")) < 0.4


def test_partitions_are_disjoint_and_deterministic():
    config = RunConfig(partition="dirichlet", dirichlet_alpha=0.5)
    table = datalib.generated_classification(500, seed=3)
    parts = [datalib.client_table(config, table, i, 4)["text"] for i in range(4)]
    again = [datalib.client_table(config, table, i, 4)["text"] for i in range(4)]
    assert parts == again
    assert sum(len(p) for p in parts) == 500


def test_max_train_examples_caps_each_client():
    config = RunConfig(partition="iid", max_train_examples=30)
    table = datalib.generated_classification(500, seed=4)
    assert all(len(datalib.client_table(config, table, i, 5)) == 30 for i in range(5))


def test_loads_csv_jsonl_and_saved_dataset(tmp_path):
    table = datalib.generated_classification(20, seed=5).rename_columns({"text": "t", "label": "y"})
    table.to_csv(tmp_path / "d.csv", index=False)
    table.to_json(tmp_path / "d.jsonl")
    table.save_to_disk(tmp_path / "saved")
    config = RunConfig(text_column="t", label_column="y")
    for path in ("d.csv", "d.jsonl", "saved"):
        loaded = datalib.load_table(str(tmp_path / path), config)
        assert loaded.column_names == ["text", "label"] and len(loaded) == 20


def test_real_dataset_loads(shared_data):
    table = datalib.load_table(str(shared_data / "banking77" / "test.csv"), RunConfig())
    assert datalib.num_labels(table) == 77


@pytest.mark.parametrize("change,needle", [
    ({"train_data": "/nope/missing.csv"}, "data file not found"),
    ({"text_column": "body"}, "missing column 'body'"),
])
def test_bad_data_config_fails_fast(tmp_path, change, needle):
    datalib.generated_classification(10, seed=0).to_csv(tmp_path / "d.csv", index=False)
    config = RunConfig(train_data=str(tmp_path / "d.csv")).replace(**change)
    with pytest.raises(ConfigError, match=needle):
        datalib.train_table(config)


def test_more_clients_than_examples():
    table = datalib.generated_classification(5, seed=0)
    with pytest.raises(ConfigError, match="more clients"):
        datalib.client_table(RunConfig(partition="iid"), table, 0, 10)
