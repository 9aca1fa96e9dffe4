"""The command-line side of issue 5: fl-node token, tui, status, and --web-public."""

from __future__ import annotations

import stat

import pytest

from node.cli.main import format_status, main
from node.config import ConfigError, build_config


def test_token_prints_the_nodes_api_token_made_once_with_mode_0600(tmp_path, capsys):
    assert main(["token", "--state-dir", str(tmp_path)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["token", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == first
    assert len(first) == 64 and int(first, 16) >= 0
    assert stat.S_IMODE((tmp_path / "api.token").stat().st_mode) == 0o600


def test_tui_without_a_running_node_says_so(tmp_path, capsys):
    assert main(["tui", "--state-dir", str(tmp_path)]) == 1
    assert "no running node" in capsys.readouterr().err


def test_tui_with_a_url_but_no_token_asks_for_one(tmp_path, capsys):
    assert main(["tui", "http://127.0.0.1:1", "--state-dir", str(tmp_path)]) == 2
    assert "--token" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_non_loopback_web_host_needs_web_public(host):
    with pytest.raises(ConfigError, match="--web-public"):
        build_config({"web_host": host}, environ={})
    assert build_config({"web_host": host, "web_public": True}, environ={}).web_public


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_web_hosts_need_no_flag(host):
    assert build_config({"web_host": host}, environ={}).web_host == host


def test_status_summary_shows_mode_and_quorum():
    text = format_status({
        "name": "a", "node_id": "ID", "federation": "f", "state": "offline", "round": 2,
        "rounds_total": 9, "accuracy": None, "loss": None, "aggregator": None,
        "model_hash": "ab" * 32, "mode": "offline", "quorum": {"need": 3, "have": 2},
        "offline_steps": 4, "peers": [],
    })
    assert "state offline  round 2/9" in text
    assert "mode offline  quorum 2/3  offline steps 4" in text
