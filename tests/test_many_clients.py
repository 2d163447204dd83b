"""Many virtual clients (issue 21): every partition scheme at 1,000 clients, node memory on disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from flwr.app import RecordDict
from flwr_datasets.partitioner import DirichletPartitioner

from pollinate import data as datalib
from pollinate import partitions
from pollinate.client.state import KEY, NodeMemory, NodeStateError
from pollinate.config import ConfigError, RunConfig
from pollinate.simulations.launch import simulate

THOUSAND = RunConfig(num_clients=1000)  # the generated task: 2,000 examples, Dirichlet(0.5)
DIGEST = ("import hashlib, json; from pollinate import data, partitions; from pollinate.config import "
          "RunConfig; c = RunConfig(num_clients=1000); s = partitions.split(c, data.train_table(c), 1000); "
          "print(hashlib.sha256(json.dumps(s.rows).encode()).hexdigest())")


def test_dirichlet_split_of_a_thousand_clients_tops_up_the_empty_ones():
    table = datalib.train_table(THOUSAND)
    split = partitions.split(THOUSAND, table, 1000)
    sizes = [len(rows) for rows in split.rows]
    assert min(sizes) == partitions.MIN_EXAMPLES
    assert sorted(r for rows in split.rows for r in rows) == list(range(len(table)))  # disjoint, complete

    # flwr-datasets' own draw (no minimum) leaves clients empty; the repair moved one row to each
    raw = DirichletPartitioner(num_partitions=1000, partition_by="label", alpha=0.5, min_partition_size=0,
                               seed=THOUSAND.seed)
    raw.dataset = table.add_column("row", list(range(len(table))))
    drawn = [set(raw.load_partition(i)["row"]) for i in range(1000)]
    empty = sum(not rows for rows in drawn)
    assert empty == split.topped_up > 0
    assert sum(len(set(rows) - drawn[i]) for i, rows in enumerate(split.rows)) == empty
    assert f"{empty} of 1000 clients" in split.note and "dirichlet-alpha" in split.note

    # computed once per table; the same split from a fresh read and in another process
    assert partitions.split(THOUSAND, table, 1000) is split
    assert datalib.client_table(THOUSAND, table, 7, 1000)["text"] == table.select(split.rows[7])["text"]
    again = partitions.split(THOUSAND, datalib.train_table(THOUSAND), 1000)
    assert again is not split and again.rows == split.rows
    other = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == hashlib.sha256(json.dumps(split.rows).encode()).hexdigest()


def test_top_up_moves_seeded_random_rows_of_the_largest_partitions():
    def repaired(seed: int) -> tuple[int, list[list[int]]]:
        parts = [[0, 1, 2, 3, 4, 5], [6, 7], [], [8], []]
        return partitions.top_up(parts, 1, seed), parts

    count, parts = repaired(3)
    assert count == 2 and [len(p) for p in parts] == [4, 2, 1, 1, 1]
    assert sorted(sum(parts, [])) == list(range(9)) and set(parts[2] + parts[4]) <= set(range(6))
    assert repaired(3) == (count, parts)
    with pytest.raises(ConfigError, match="lower num-clients"):
        partitions.top_up([[0, 1], [2], []], 2, 0)


def test_classes_and_iid_at_a_thousand_clients():
    table = datalib.train_table(THOUSAND)
    with pytest.raises(ConfigError, match="lower classes-per-client or num-clients, or use partition=iid"):
        partitions.split(THOUSAND.replace(partition="classes"), table, 1000)
    one = partitions.split(THOUSAND.replace(partition="classes", classes_per_client=1), table, 1000)
    labels = table["label"]
    assert all(len({labels[r] for r in rows}) == 1 for rows in one.rows) and not one.topped_up
    iid = partitions.split(THOUSAND.replace(partition="iid"), table, 1000)
    assert {len(rows) for rows in iid.rows} == {2} and not iid.note


def test_node_memory_in_a_directory_leaves_only_its_path_in_the_context(tmp_path):
    memory = NodeMemory(3, {"w": torch.randn(4, 2)}, {"w": torch.ones(4, 2)}, {"dp-accountant": b"\x01\x02"})
    in_context = RecordDict()
    memory.store(in_context)
    assert NodeMemory.load(in_context).extra == memory.extra

    on_disk = RecordDict()
    memory.store(on_disk, str(tmp_path / "nodes"), node_id=42)
    path = tmp_path / "nodes" / "42.safetensors"
    assert dict(on_disk[KEY]) == {"file": str(path)} and path.stat().st_size > 8 * 4 * 2 * 2
    loaded = NodeMemory.load(on_disk)
    assert loaded.held_version == 3 and loaded.extra == memory.extra
    assert torch.equal(loaded.held_state["w"], memory.held_state["w"])
    assert NodeMemory.load(RecordDict()).held_version == 0  # a new run's node ignores an old file
    path.unlink()
    with pytest.raises(NodeStateError, match="42.safetensors"):  # an accountant never restarts from 0
        NodeMemory.load(on_disk)


@pytest.mark.slow
def test_a_thousand_clients_with_the_default_dirichlet_split_aggregate_every_round(tmp_path):
    """The reported bug: every client of every round failed on the Dirichlet split at 1,000 clients."""
    config = RunConfig(num_clients=1000, fraction_train=0.005, num_server_rounds=2, local_steps=1,
                       max_length=16, test_examples=100, out=str(tmp_path / "run"))
    summary = simulate(config)
    assert summary["status"] == "ok"
    assert [r["clients"] for r in summary["rounds"][1:]] == [5, 5]
    assert summary["partition"]["topped_up"] == partitions.split(
        THOUSAND, datalib.train_table(THOUSAND), 1000).topped_up > 0
    assert "topped up" in summary["partition"]["note"] and summary["partition"]["min_examples"] == 1
    assert "topped up" in (tmp_path / "run" / "server.log").read_text()
    assert summary["config"]["node-state-dir"] == str((tmp_path / "run" / "nodes").resolve())
    assert not (tmp_path / "run" / "nodes").exists()  # the launcher's scratch directory is removed


@pytest.mark.slow
def test_nodes_keep_their_memory_in_the_node_state_dir_between_rounds(tmp_path):
    nodes = tmp_path / "nodes"
    config = RunConfig(num_clients=3, num_server_rounds=2, local_steps=1, max_length=16, test_examples=50,
                       max_train_examples=40, out=str(tmp_path / "run"), node_state_dir=str(nodes))
    simulate(config)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    second = rounds[2]["client_metrics"]
    # round 2 sends each node only the increment from the version its file holds
    assert [(c["downlink"], c["status"], c["used"]) for c in second] == [("increment", "ok", True)] * 3
    assert {p.stem for p in nodes.glob("*.safetensors")} == {str(c["node"]) for c in second}
    for path in nodes.glob("*.safetensors"):
        memory = NodeMemory.from_bytes(path.read_bytes())
        assert memory.held_version == 2 and memory.held_state and memory.residual
    assert not list(nodes.glob(".*"))  # no temporary file left behind
