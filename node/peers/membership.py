"""Membership: the keys a node knows of, its links, and which keys are live members.

A trusted key is a member while it has a link to us, or while signed announcements that
name it keep coming through relays (newer than its last link drop, at most
``member_timeout`` seconds apart). The round machine only sees members come and go
(``peer_up`` / ``peer_down``); everything else a node knows of a key, trusted or not, is
kept in its ``PeerStats`` for status.
"""

from __future__ import annotations

from collections.abc import Callable

from node.peers.checks import MAX_STRIKES
from node.peers.peerstats import PeerStats
from node.trust.policy import TrustPolicy
from protocol.identity import node_id_from_key
from protocol.rounds import RoundMachine

#: Records kept of keys that are not trusted (strangers that completed a handshake,
#: nodes discovered or announced but not trusted): the least recently seen go first.
MAX_STRANGERS = 64
#: A stranger's record is dropped after this long without a sign of it.
STRANGER_TTL_S = 600.0


class PeerTable:
    """The peers one node knows of (``known``), its links, and live membership."""

    def __init__(self, machine: RoundMachine, trust: TrustPolicy,
                 member_timeout: float) -> None:
        self.machine = machine
        self.trust = trust
        self.member_timeout = member_timeout
        self.known: dict[bytes, PeerStats] = {}
        self.links: set[bytes] = set()
        self._drops: list[bytes] = []
        #: Called with (key, reason, cut off) when what a member sent fails a check.
        self.on_strike: Callable[[bytes, str, bool], None] = lambda key, reason, cut: None

    def stats(self, key: bytes, name: str = "") -> PeerStats:
        """The record of ``key`` (created on first sight; the least recently seen
        stranger's record makes room when ``MAX_STRANGERS`` are kept)."""
        st = self.known.get(key)
        if st is None:
            self._make_room()
            st = self.known[key] = PeerStats(name=name or node_id_from_key(key)[:9])
        return st

    def _strangers(self) -> list[tuple[bytes, PeerStats]]:
        """Records of keys that are neither trusted, members, linked nor cut off."""
        return [(k, st) for k, st in self.known.items()
                if not (st.trusted or st.member or st.banned or k in self.links)]

    def _make_room(self) -> None:
        strangers = self._strangers()
        if len(strangers) >= MAX_STRANGERS:
            oldest = min(strangers, key=lambda item: item[1].last_seen)[0]
            del self.known[oldest]

    def note_untrusted(self, key: bytes, name: str, address: str, now: float) -> None:
        """A node completed a handshake (or was discovered) but is not trusted."""
        st = self.stats(key, name)
        st.name = name or st.name
        st.address = address or st.address
        st.last_seen = now

    def note_discovered(self, key: bytes, name: str, address: str) -> None:
        """Discovery found ``key`` at ``address``: shown in status. Discovery grants no
        trust; a key trusted without proof (pinned, paired, open) is shown as such."""
        st = self.stats(key, name)
        st.discovered = True
        st.address = st.address or address
        if not st.trusted:
            st.trusted = self.trust.static(key) is not None

    def untrust(self, key: bytes, source: str) -> bool:
        """Stop trusting ``key`` if it was trusted for ``source`` (a pairing removed);
        True if it was."""
        st = self.known.get(key)
        if st is None or st.trust != source:
            return False
        st.trusted, st.trust = False, ""
        return True

    def up(self, key: bytes, name: str, round_number: int, address: str, trust: str,
           now: float) -> None:
        """A trusted peer's link is up (handshake and admission done)."""
        st = self.stats(key, name)
        st.name, st.address, st.rounds = name, address, round_number
        st.state, st.last_seen = "connected", now
        st.trusted, st.trust = True, trust
        st.served_round = -1  # a new link: the peer may have restarted and lost the model
        self.links.add(key)
        self.set_member(key, True, now)

    def down(self, key: bytes, now: float) -> None:
        """A peer's link went down. It stays a member only if announcements heard after
        this moment show it is still reachable through others."""
        self.links.discard(key)
        st = self.known.get(key)
        if st is None:
            return
        st.link_down_at = now
        self.set_member(key, self.reachable(key, now), now)

    def reachable(self, key: bytes, now: float) -> bool:
        """Whether ``key`` is trusted and linked, or announced through relays lately."""
        st = self.known.get(key)
        if st is None or not st.trusted:
            return False
        if key in self.links:
            return True
        return st.last_announce > st.link_down_at and now - st.last_announce <= self.member_timeout

    def set_member(self, key: bytes, live: bool, now: float) -> None:
        """Tell the round machine when ``key`` becomes or stops being a live member."""
        st = self.stats(key)
        if live and not st.member:
            st.member = True
            self.machine.peer_up(key, now, round=st.rounds, state=st.state)
        elif not live and st.member:
            st.member = False
            self.machine.peer_down(key, now)

    def expire(self, now: float) -> None:
        """Expire relayed members whose announcements stopped, and strangers silent for
        ``STRANGER_TTL_S``."""
        for key, st in list(self.known.items()):
            if st.member and key not in self.links and not self.reachable(key, now):
                self.set_member(key, False, now)
        for key, st in self._strangers():
            if now - st.last_seen > STRANGER_TTL_S:
                del self.known[key]

    def strike(self, key: bytes, reason: str, now: float) -> bool:
        """``key`` sent something that failed a check; True when this strike cuts it off
        (``MAX_STRIKES``): it is no longer trusted nor a member, for the rest of the run."""
        st = self.stats(key)
        st.strikes += 1
        st.last_strike = reason
        if st.banned or st.strikes < MAX_STRIKES:
            return False
        st.banned, st.trusted, st.trust = True, False, ""
        self.set_member(key, False, now)
        return True

    def refuse(self, key: bytes, reason: str, now: float) -> None:
        """What ``key`` signed failed a check (node.peers.checks): a strike, reported
        through ``on_strike``; the one that cuts it off also queues its link's closing."""
        st = self.known.get(key)
        if st is None or not (st.trusted or st.banned):
            # A signer nobody trusts (a model relayed by a member): refused, but no
            # record is made for it, so fresh keys cannot grow the table of cut-off keys.
            self.on_strike(key, reason, False)
            return
        cut = self.strike(key, reason, now)
        if cut:
            self._drops.append(key)
        self.on_strike(key, reason, cut)

    def take_drops(self) -> list[bytes]:
        """Keys whose links must be closed now (cut off for failed checks)."""
        out, self._drops = self._drops, []
        return out

    def banned(self, key: bytes) -> bool:
        """Whether ``key`` was cut off for failed checks."""
        st = self.known.get(key)
        return st is not None and st.banned

    def peer_state(self, key: bytes, now: float) -> str:
        """connected, relayed, suspect, gone, banned or untrusted, for status."""
        st = self.known[key]
        if st.banned:
            return "banned"
        if not st.trusted:
            return "untrusted"
        if key in self.links:
            return "connected"
        if st.member:
            age = now - st.last_announce
            return "relayed" if age <= self.member_timeout / 2 else "suspect"
        return "gone"
