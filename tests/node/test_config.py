"""Configuration: TOML < environment < flags, and a clear error with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from node.config import ConfigError, build_config


def test_flags_override_environment_override_toml(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nname = "from-toml"\nport = 7001\nrounds = 3\npeer = ["h:1"]\n'
                   'local-epochs = 4\n')
    env = {"FL_NODE_PORT": "7002", "FL_NODE_LR": "0.2"}
    c = build_config({"port": 7003}, config_file=str(cfg), environ=env)
    assert (c.name, c.port, c.rounds, c.lr, c.local_epochs) == ("from-toml", 7003, 3, 0.2, 4)
    assert c.peers == ("h:1",) and c.effective_min_peers == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"port": 70000}, "--port 70000"),
        ({"peers": ("nocolon",)}, "--peer 'nocolon'"),
        ({"partition_index": 3, "num_partitions": 3}, "--partition-index 3"),
        ({"lr": -1.0}, "--lr -1.0"),
        ({"rounds": 0}, "--rounds"),
        ({"name": "bad name!"}, "--name"),
        ({"download": True}, "digits needs no download"),
    ],
)
def test_bad_values_say_which_and_why(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(flags, environ={})


def test_bad_toml_and_unknown_keys_are_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config({}, config_file=str(bad), environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        build_config({}, config_file=str(unknown), environ={})
    with pytest.raises(ConfigError, match="FL_NODE_PORT"):
        build_config({}, environ={"FL_NODE_PORT": "seven"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--port", "99999"], "--port 99999"),
        (["start", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["start", "--rounds", "many"], "invalid int value"),
        (["start", "--config", "/nonexistent.toml"], "--config /nonexistent.toml"),
        (["start", "--peer", "h:0"], "--peer 'h:0'"),
    ],
)
def test_cli_rejects_bad_values_with_exit_code_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "node.cli.main", *args,
                           "--state-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize(("peers", "flags", "quorum", "wait"), [
    (0, {}, 1, 0),                                  # alone: every round is ours
    (1, {}, 2, 1),                                  # two nodes: both needed
    (2, {}, 2, 2),                                  # three: a majority of 2
    (3, {}, 3, 3),                                  # four: 3, so a 2+2 split runs no rounds
    (4, {}, 3, 4),
    (3, {"min_peers": 1}, 2, 3),                    # the operator's choice wins
    (3, {"wait_peers": 0}, 3, 0),
    (0, {"min_peers": 2}, 3, 2),                    # waits at least for its quorum
])
def test_quorum_defaults_to_a_majority_of_the_static_federation(peers, flags, quorum, wait):
    c = build_config({"peers": tuple(f"h:{i + 1}" for i in range(peers)), **flags}, environ={})
    assert (c.quorum, c.effective_wait_peers) == (quorum, wait)


def test_a_negative_wait_peers_is_refused():
    with pytest.raises(ConfigError, match="--wait-peers"):
        build_config({"wait_peers": -1}, environ={})
