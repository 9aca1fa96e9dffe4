"""One configuration object, loaded from a TOML file, then FL_NODE_* variables, then flags.

Every field is documented in ``FIELDS`` (the help text of its flag) and in README.md.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from protocol.envelope import DEFAULT_MAX_MESSAGE_SIZE

DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")
PARTITIONS = ("iid", "dirichlet")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PEER_RE = re.compile(r"^(?:(?P<key>[A-Za-z0-9_=-]{17,64})@)?"
                      r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")
SECRET_ENV = "FL_NODE_FEDERATION_SECRET"
MIN_SECRET_BYTES = 16


def parse_peer(text: str) -> tuple[str | None, str]:
    """``[KEY@]HOST:PORT`` -> (KEY or None, "HOST:PORT"); ValueError if malformed."""
    m = _PEER_RE.match(text)
    if not m or not 0 < int(m.group("port")) <= 65535:
        raise ValueError(f"--peer {text!r}: expected [KEY@]HOST:PORT")
    return m.group("key"), f"{m.group('host')}:{m.group('port')}"


def read_federation_secret(config: NodeConfig, environ: dict[str, str] | None = None
                           ) -> bytes | None:
    """The federation secret from FL_NODE_FEDERATION_SECRET or --federation-secret-file.

    Never from a flag's value: command lines are visible to every user of the machine.
    """
    environ = dict(os.environ) if environ is None else environ
    secret: bytes | None = None
    if environ.get(SECRET_ENV):
        secret = environ[SECRET_ENV].encode()
    elif config.federation_secret_file:
        try:
            secret = Path(config.federation_secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"--federation-secret-file {config.federation_secret_file}:"
                              f" {exc.strerror}") from None
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"federation secret: at least {MIN_SECRET_BYTES} bytes, please"
                          " (e.g. `openssl rand -hex 32`)")
    return secret


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


def parse_key(text: str) -> bytes | str:
    """A pinned peer key: 64 hex digits or 43 base64url characters give the key itself;
    a node id (``XXXX-XXXX-XXXX-XXXX-X``, dashes optional) is returned normalised."""
    from protocol.identity import is_valid_node_id

    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if re.fullmatch(r"[A-Za-z0-9_-]{43}=?", text):
        return base64.urlsafe_b64decode(text.rstrip("=") + "=")
    if is_valid_node_id(text):
        raw = text.replace("-", "").upper()
        return "-".join(raw[i : i + 4] for i in range(0, 17, 4))
    raise ValueError(f"--peer key {text!r}: expected a node id, 64 hex digits or 43"
                     " base64url characters")


def default_state_dir(name: str) -> str:
    """``$XDG_STATE_HOME/fl-node/<name>`` (``~/.local/state/fl-node/<name>``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return os.path.join(base, "fl-node", name)


@dataclass(frozen=True)
class NodeConfig:
    """Everything `fl-node start` can be told. Defaults are what a fresh node uses."""

    name: str = "node"
    state_dir: str = ""
    federation: str = "default"
    host: str = "0.0.0.0"
    port: int = 7700
    web_host: str = "127.0.0.1"
    web_port: int = 7800
    web_public: bool = False
    web_allowed_hosts: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    min_peers: int | None = None
    wait_peers: int | None = None
    federation_secret_file: str | None = None
    open: bool = False
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    fanout: int = 4
    announce_interval: float = 2.0
    dataset: str = "digits"
    plugins: tuple[str, ...] = ()
    data_dir: str | None = None
    download: bool = False
    model: str = "cnn"
    partition: str = "iid"
    alpha: float = 0.5
    num_partitions: int = 1
    partition_index: int = 0
    seed: int = 0
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    strategy: str = "fedavg"
    mu: float | None = None
    trim_beta: float | None = None
    krum_f: int | None = None
    multi_krum_m: int | None = None
    server_lr: float | None = None
    clip_norm: float | None = None
    #: An update may change the global model by at most this multiple of its L2 norm
    #: (or of 1, if the model's norm is smaller) before it is refused (docs/trust.md).
    update_norm_bound: float = 10.0
    compress: str = "none"
    dp: bool = False
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    round_timeout: float = 60.0
    start_timeout: float = 60.0
    heartbeat_interval: float = 1.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    log_level: str = "INFO"
    log_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def effective_min_peers(self) -> int:
        """Peers an elected round needs (the quorum is this plus the node itself): by
        default a majority of the federation the static peers describe, that is half of
        ``--peer`` addresses plus one, rounded down (0 without any)."""
        return (len(self.peers) + 1) // 2 if self.min_peers is None else self.min_peers

    @property
    def quorum(self) -> int:
        """Members (this node included) an elected round needs."""
        return self.effective_min_peers + 1

    @property
    def effective_wait_peers(self) -> int:
        """Peers a fresh node waits for (up to ``start_timeout``) before round 1: by default
        every static peer, and at least ``min_peers``."""
        if self.wait_peers is not None:
            return self.wait_peers
        return max(len(self.peers), self.effective_min_peers)

    @property
    def resolved_state_dir(self) -> str:
        """``state_dir`` or the default one for this node's name."""
        return self.state_dir or default_state_dir(self.name)

    def validated(self) -> NodeConfig:
        """Return self if every value is acceptable, else raise ConfigError naming every
        problem."""
        problems = [*self._network_problems(), *self._data_problems(),
                    *self._learning_problems(), *self._runtime_problems()]
        if problems:
            raise ConfigError("; ".join(problems))
        return replace(self, log_level=self.log_level.upper())

    def _network_problems(self) -> list[str]:
        """What is wrong with the addresses, ports, peers and the web host settings."""
        problems: list[str] = []
        need = _collector(problems)
        need(bool(_NAME_RE.fullmatch(self.name)), f"--name {self.name!r}: 1-64 letters, digits, . _ -")
        need(bool(_NAME_RE.fullmatch(self.federation)), f"--federation {self.federation!r}: 1-64"
             " letters, digits, . _ -")
        for label, port in (("--port", self.port), ("--web-port", self.web_port)):
            need(0 <= port <= 65535, f"{label} {port}: must be 0-65535 (0 picks a free port)")
        for peer in self.peers:
            try:
                key, _ = parse_peer(peer)
                if key is not None:
                    parse_key(key)
            except ValueError as exc:
                problems.append(str(exc))
        need(self.min_peers is None or self.min_peers >= 0, "--min-peers: must be >= 0")
        need(self.web_public or is_loopback(self.web_host),
             f"--web-host {self.web_host}: the web API (control plane) is reachable from"
             " other machines there; add --web-public to allow it")
        need(self.wait_peers is None or self.wait_peers >= 0, "--wait-peers: must be >= 0")
        return problems

    def _data_problems(self) -> list[str]:
        """What is wrong with the data set, partitioning and local training settings."""
        problems: list[str] = []
        need = _collector(problems)
        need(self.dataset in DATASETS or bool(self.plugins),
             f"--dataset {self.dataset!r}: one of {', '.join(DATASETS)} (or one a --plugin"
             " registers)")
        need(self.partition in PARTITIONS, f"--partition {self.partition!r}: iid or dirichlet")
        need(self.alpha > 0, f"--alpha {self.alpha}: must be > 0")
        need(self.num_partitions >= 1, "--num-partitions: must be >= 1")
        need(0 <= self.partition_index < max(self.num_partitions, 1),
             f"--partition-index {self.partition_index}: must be in 0..{self.num_partitions - 1}")
        need(self.rounds >= 1, "--rounds: must be >= 1")
        need(self.local_epochs >= 1, "--local-epochs: must be >= 1")
        need(self.batch_size >= 1, "--batch-size: must be >= 1")
        need(0 < self.lr <= 10, f"--lr {self.lr}: must be in (0, 10]")
        return problems

    def _learning_problems(self) -> list[str]:
        """What is wrong with the aggregation and differential privacy settings."""
        problems: list[str] = []
        need = _collector(problems)
        need(self.mu is None or self.mu >= 0, f"--mu {self.mu}: must be >= 0")
        need(self.trim_beta is None or 0 <= self.trim_beta < 0.5,
             f"--trim-beta {self.trim_beta}: must be in [0, 0.5)")
        need(self.krum_f is None or self.krum_f >= 0, f"--krum-f {self.krum_f}: must be >= 0")
        need(self.multi_krum_m is None or self.multi_krum_m >= 1, "--multi-krum-m: must be >= 1")
        need(self.server_lr is None or self.server_lr > 0, "--server-lr: must be > 0")
        need(self.clip_norm is None or self.clip_norm > 0, "--clip-norm: must be > 0")
        need(0 < self.update_norm_bound < math.inf, "--update-norm-bound: must be > 0")
        need(self.target_epsilon is None or self.target_epsilon > 0,
             "--target-epsilon: must be > 0")
        need(0 < self.delta < 1, f"--delta {self.delta}: must be in (0, 1)")
        need(self.max_grad_norm > 0, f"--max-grad-norm {self.max_grad_norm}: must be > 0")
        need(self.noise_multiplier is None or self.noise_multiplier > 0,
             "--noise-multiplier: must be > 0")
        need(not self.dp or self.target_epsilon is not None or self.noise_multiplier is not None,
             "--dp needs --target-epsilon (a budget) or --noise-multiplier")
        return problems

    def _runtime_problems(self) -> list[str]:
        """What is wrong with the timing, gossip, size, logging and download settings."""
        problems: list[str] = []
        need = _collector(problems)
        need(self.round_timeout > 0, "--round-timeout: must be > 0")
        need(self.start_timeout >= 0, "--start-timeout: must be >= 0")
        need(self.heartbeat_interval > 0, "--heartbeat-interval: must be > 0")
        need(self.announce_interval > 0, "--announce-interval: must be > 0")
        need(1 <= self.fanout <= 64, "--fanout: must be 1-64")
        need(self.max_message_size >= 64 * 1024, "--max-message-size: must be >= 65536")
        need(self.log_level.upper() in LOG_LEVELS, f"--log-level: one of {', '.join(LOG_LEVELS)}")
        if self.download and self.dataset in ("digits", "synthetic"):
            problems.append(f"--download: {self.dataset} needs no download")
        return problems


def _collector(problems: list[str]) -> Callable[[bool, str], None]:
    """``need(ok, text)``: adds ``text`` to ``problems`` unless ``ok``."""

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    return need


FIELD_TYPES = {f.name: f.type for f in fields(NodeConfig) if f.name != "extra"}


def coerce(key: str, value: Any, source: str) -> Any:
    kind = FIELD_TYPES[key]
    try:
        if kind in ("int",):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "int | None":
            return None if value in (None, "") else int(value)
        if kind in ("float", "float | None"):
            if kind == "float | None" and value in (None, ""):
                return None
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "tuple[str, ...]":
            if isinstance(value, str):
                return tuple(p.strip() for p in value.split(",") if p.strip())
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if kind in ("str", "str | None"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} = {value!r} is not a valid {kind}") from None
    raise AssertionError(kind)


def from_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file (keys as the flags, with - or _); ConfigError if bad."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    table = raw.get("node", raw)
    out: dict[str, Any] = {}
    for key, value in table.items():
        k = key.replace("-", "_")
        if k == "peer":
            k = "peers"
        if k not in FIELD_TYPES:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        out[k] = coerce(k, value, f"--config {path}")
    return out


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``FL_NODE_<FIELD>`` variables (e.g. FL_NODE_PORT, FL_NODE_PEERS=a:1,b:2)."""
    environ = dict(os.environ) if environ is None else environ
    out: dict[str, Any] = {}
    for key in FIELD_TYPES:
        value = environ.get(f"FL_NODE_{key.upper()}")
        if value is not None:
            out[key] = coerce(key, value, f"FL_NODE_{key.upper()}")
    return out


def build_config(flags: dict[str, Any], *, config_file: str | None = None,
                 environ: dict[str, str] | None = None) -> NodeConfig:
    """Defaults < TOML file < environment < flags given on the command line."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(from_toml(config_file))
    values.update(from_env(environ))
    values.update({k: v for k, v in flags.items() if v is not None})
    return NodeConfig(**values).validated()
