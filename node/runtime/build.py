"""Building a node from its configuration: the one place the daemon's parts are made.

``build_node`` opens the state dir (key, API token, trust store, database, checkpoints),
makes the round machine, the node core and the executor, restores the newest good
checkpoint (node.runtime.restore), and hands it all to the supervisor
(node.runtime.supervisor.Node), which only runs them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from node.common.compress import parse_codec
from node.common.health import Health
from node.common.state import (
    SequenceCounter,
    load_or_create_api_token,
    load_or_create_identity,
)
from node.common.weights import to_tensors
from node.config import NodeConfig, parse_key, parse_peer, read_federation_secret
from node.peers.core import NodeCore
from node.peers.transport import now
from node.runtime.checkpoints import CheckpointStore, NodeDB
from node.runtime.control import NodeEvents, round_timeouts
from node.runtime.executor import Executor
from node.runtime.learner import Learner
from node.runtime.supervisor import Node
from node.trust.policy import TrustPolicy
from node.trust.store import TrustStore
from node.web.hub import EventHub
from protocol.gossip import federation_key
from protocol.rounds import RoundMachine


def static_peers(config: NodeConfig) -> tuple[list[tuple[bytes | str | None, str]],
                                                set[bytes], set[str]]:
    """``--peer`` entries as (expected key or id, address), and the keys and ids they pin."""
    peers: list[tuple[bytes | str | None, str]] = []
    keys: set[bytes] = set()
    ids: set[str] = set()
    for peer in config.peers:
        key_text, address = parse_peer(peer)
        key = parse_key(key_text) if key_text else None
        if isinstance(key, bytes):
            keys.add(key)
        elif isinstance(key, str):
            ids.add(key)
        peers.append((key, address))
    return peers, keys, ids


def build_node(config: NodeConfig, learner: Learner) -> Node:
    """A node ready to ``run()``, resumed from its state dir (ValueError or OSError if the
    state dir, trust store or federation secret cannot be used)."""
    state_dir = Path(config.resolved_state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    identity = load_or_create_identity(state_dir)
    genesis = {k: np.asarray(v, order="C") for k, v in learner.initial_weights().items()}
    genesis_tensors = to_tensors(genesis)
    machine = RoundMachine(
        self_key=identity.public_key, federation=config.federation, rounds_total=config.rounds,
        genesis=genesis_tensors, wait_peers=config.effective_wait_peers,
        quorum=config.quorum, timeouts=round_timeouts(config.round_timeout,
                                                      config.start_timeout))
    trust_store = TrustStore(state_dir)
    peers, pinned_keys, pinned_ids = static_peers(config)
    secret = read_federation_secret(config)
    trust = TrustPolicy(store=trust_store,
                        federation_key=federation_key(secret, config.federation) if secret
                        else None,
                        open=config.open, pinned=pinned_keys, pinned_ids=pinned_ids)
    core = NodeCore(
        identity=identity, name=config.name, federation=config.federation, port=config.port,
        machine=machine, seq=SequenceCounter(state_dir), trust=trust,
        max_message_size=config.max_message_size, fanout=config.fanout,
        # Relayed members expire after three silent intervals, and never sooner than 6 s,
        # so a busy node or a slow relay does not drop them spuriously.
        member_timeout=max(3 * config.announce_interval, 6.0))
    # Kept to serve a member that cannot build the genesis model itself (another
    # implementation: docs/protocol.md 9.8); one copy of the model's bytes.
    core.genesis = genesis_tensors
    checkpoints = CheckpointStore(state_dir)
    db = NodeDB(state_dir)
    health = Health()
    events = NodeEvents(db, EventHub(), health)
    core.peers.on_strike = events.member_failed_check
    executor = Executor(core=core, learner=learner, checkpoints=checkpoints, round_log=db,
                        events=events, health=health, now=now, wall=time.time,
                        codec=parse_codec(config.compress), genesis=genesis,
                        update_norm_bound=config.update_norm_bound)
    restored = executor.resume(checkpoints, max_size=config.max_message_size)
    if restored.weights is not None:
        rows = [r for r in db.rounds()
                if r["round"] <= restored.round and r["accuracy"] is not None]
        if rows:
            executor.accuracy, executor.loss = rows[-1]["accuracy"], rows[-1]["loss"]
            executor.evaluated_round = rows[-1]["round"]
    return Node(config=config, learner=learner, identity=identity, core=core,
                executor=executor, trust=trust, trust_store=trust_store,
                api_token=load_or_create_api_token(state_dir), db=db, health=health,
                events=events, static_peers=peers, resumed_from=restored.round,
                resumed_offline_step=restored.offline_step)
