"""The status view of a running node: the object served at ``GET /api/status``
(docs/api.md), also pushed to the page and the TUI as ``status_update``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from node.common.resources import resources
from node.peers.transport import now
from protocol.identity import node_id_from_key
from protocol.rounds import Phase

if TYPE_CHECKING:
    from node.runtime.supervisor import Node


def peers_view(node: Node) -> list[dict[str, Any]]:
    """One entry per key the node knows of (members, relayed, untrusted)."""
    out = []
    t = now()
    for key, st in node.core.known.items():
        link = node.transport.links.get(key)
        out.append({
            "node_id": node_id_from_key(key), "name": st.name,
            "address": link.address if link else st.address,
            "state": node.core.peers.peer_state(key, t), "trusted": st.trusted,
            "trust": st.trust or None, "discovered": st.discovered,
            "round": st.rounds, "peer_state": st.state,
            "last_seen": (time.time() - (t - st.last_seen)) if st.last_seen else None,
            "rtt_ms": st.rtt_ms, "rejected": st.rejected,
            "strikes": st.strikes, "last_strike": st.last_strike or None,
            "links": [node_id_from_key(k) for k in st.links],
        })
    return out


def _rounds_view(node: Node) -> dict[str, Any]:
    m = node.machine
    agg = m.aggregator or m.last_aggregator
    return {
        "state": node.state,
        "round": m.completed,
        "rounds_total": m.rounds_total,
        "current_round": m.current if m.phase is not Phase.DONE else m.completed,
        "aggregator": node_id_from_key(agg) if agg else None,
        "is_aggregator": agg == node.public_key if agg else False,
        "attempt": m.attempt,
        "mode": "offline" if m.offline else "elected",
        "quorum": {"need": m.quorum, "have": len(m.live())},
        "members": sorted(node_id_from_key(k) for k in m.members()),
        "offline_steps": m.offline_steps,
        "collect_deadline_s": round(m.deadlines.collect(), 3),
        "model_hash": node.model_hash(),
        "global_model_hash": m.model_digest.hex(),
        "genesis_hash": m.genesis_digest.hex(),
        "stopped_reason": node.executor.stopped_reason if m.phase is Phase.STOPPED else None,
    }


def node_status(node: Node) -> dict[str, Any]:
    """The status object of ``node``."""
    ex, c = node.executor, node.core.counters
    return {
        "node_id": node.node_id,
        "name": node.config.name,
        "federation": node.config.federation,
        **_rounds_view(node),
        "peers": peers_view(node),
        "model_raw_bytes": int(sum(v.nbytes for v in ex.weights.values())),
        "accuracy": ex.accuracy,
        "loss": ex.loss,
        "evaluated_round": ex.evaluated_round,
        "resumed_from": node.resumed_from,
        "checkpoint_round": ex.checkpoint_round,
        "resumed_offline_step": node.resumed_offline_step,
        "offline_checkpoint_step": ex.offline_checkpoint_step,
        "peer_port": node.peer_port,
        "web_port": node.web_port,
        "uptime_s": time.time() - node.started_at,
        "trust": {"federation_secret": node.trust.federation_key is not None,
                  "open": node.trust.open, "paired": len(node.trust_store)},
        "traffic": {
            "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
            "messages_sent": c.messages_sent, "messages_received": c.messages_received,
            "rejected": c.rejected, "rejected_reasons": dict(c.rejected_reasons),
            "recent_rejections": list(c.recent_rejections),
            "duplicates": c.duplicates, "relayed": c.relayed,
        },
        "learner": node.learner.describe(),
        "resources": resources(),
        "privacy": node.learner.privacy(),
        "health": node.health.as_json(),
    }
