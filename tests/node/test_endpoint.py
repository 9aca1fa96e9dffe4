"""Local tools find a running node's web API from its endpoint file (node.common.endpoint),
whatever address the node binds: a wildcard means loopback, IPv6 goes in brackets."""

from __future__ import annotations

import pytest

from node.common.endpoint import (
    advertised_addresses,
    endpoint_url,
    local_url,
    read_endpoint,
    write_endpoint,
)


@pytest.mark.parametrize(("bind", "url"), [
    ("127.0.0.1", "http://127.0.0.1:7701"),
    ("0.0.0.0", "http://127.0.0.1:7701"),
    ("", "http://127.0.0.1:7701"),
    ("::", "http://[::1]:7701"),  # was http://:::7701, which no client can open
    ("[::]", "http://[::1]:7701"),
    ("::1", "http://[::1]:7701"),
    ("fd00::5", "http://[fd00::5]:7701"),
    ("node-a.lan", "http://node-a.lan:7701"),
])
def test_a_local_url_for_every_bind_address(bind, url):
    assert local_url(bind, 7701) == url


def test_the_endpoint_file_round_trips_and_names_the_url(tmp_path):
    write_endpoint(tmp_path, node_id="ABCD", peer_port=7700, web_port=7701, web_host="::")
    endpoint = read_endpoint(tmp_path)
    assert endpoint["peer_port"] == 7700 and endpoint["node_id"] == "ABCD"
    assert endpoint_url(endpoint) == "http://[::1]:7701"


def test_a_broken_endpoint_file_is_refused(tmp_path):
    (tmp_path / "endpoint.json").write_text('{"web_port": "7701"}')
    with pytest.raises(ValueError):
        read_endpoint(tmp_path)
    (tmp_path / "endpoint.json").write_text("not json")
    with pytest.raises(ValueError):
        read_endpoint(tmp_path)


def test_a_wildcard_peer_port_advertises_this_hosts_addresses():
    assert advertised_addresses("10.1.2.3", 7700) == ("10.1.2.3:7700",)
    addresses = advertised_addresses("0.0.0.0", 7700)
    assert addresses and all(a.endswith(":7700") and not a.startswith("0.0.0.0")
                             for a in addresses)
