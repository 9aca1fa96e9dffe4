"""The node daemon's supervisor: one task group over the transport, the web API, timers,
the worker and discovery, with one failure policy and a graceful shutdown.

``Node`` is built by node.runtime.build (which also restores checkpoints) and only runs:
the round machine (protocol.rounds) decides, the shared ``Executor`` carries its actions
out, and this module moves bytes and time: it runs the executor's jobs on a worker thread
(the event loop never blocks), puts the core's frames on links, re-arms the deadline
timer after every input, and writes checkpoints off the loop.

Failure policy (docs/architecture.md): an unexpected exception in a supervised task is
reported once, with its traceback, to ``Health`` (status and ``/healthz`` show the node
``degraded`` with the reason). Tasks the node can live without (checkpointer, discovery,
announcements, heartbeats) are restarted after a pause; a failure of the round timer or of
the worker loop itself stops the node cleanly: ``run()`` raises ``NodeFailed`` with a
one-line reason, which the command line prints before exiting with code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from node.common.connguard import ConnectionGuard, server_options
from node.common.endpoint import ENDPOINT_FILE, advertised_addresses, write_endpoint
from node.common.health import Health, describe
from node.common.wsclose import close_ws
from node.config import NodeConfig
from node.peers.core import NodeCore
from node.peers.pair_flow import (
    OLD_PAIR_PATH,
    PAIR_PATH,
    Pairing,
    handle_pair_request,
    old_pair_path,
)
from node.peers.transport import Link, PeerTransport, now
from node.runtime.checkpoints import NodeDB
from node.runtime.control import NodeControl, NodeEvents
from node.runtime.executor import Executor
from node.runtime.jobs import Job, QueuedJob, advance
from node.runtime.learner import Learner
from node.trust.pairing import TokenBook
from node.trust.policy import TrustPolicy
from node.trust.store import TrustStore
from node.web.hostguard import allowed_hosts_for
from node.web.hub import EventHub
from protocol.envelope import Envelope
from protocol.identity import Identity, node_id_from_key
from protocol.messages import Heartbeat, Hello
from protocol.rounds import RoundMachine

log = logging.getLogger(__name__)

#: Seconds before a failed restartable task runs again (doubling up to the cap).
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
#: A restarted task that runs this long without failing again has recovered.
RECOVERY_S = 10.0
#: While a checkpoint write keeps failing (disk full), it is retried this often.
CHECKPOINT_RETRY_S = 5.0


class NodeFailed(Exception):
    """The node stopped because a task it cannot run without failed (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Node:
    """A running fl-node: ``node.runtime.build.build_node(config, learner)``, then
    ``await node.run()``."""

    def __init__(self, *, config: NodeConfig, learner: Learner, identity: Identity,
                 core: NodeCore, executor: Executor, trust: TrustPolicy,
                 trust_store: TrustStore, api_token: str, db: NodeDB, health: Health,
                 events: NodeEvents, static_peers: list[tuple[bytes | str | None, str]],
                 resumed_from: int, resumed_offline_step: int) -> None:
        self.config = config
        self.learner = learner
        self.identity = identity
        self.core = core
        self.machine: RoundMachine = core.machine
        self.executor = executor
        self.trust = trust
        self.trust_store = trust_store
        self.pairing_tokens = TokenBook()
        self.api_token = api_token
        self.db = db
        self.health = health
        #: The event log and live events.
        self.events = events
        self.hub: EventHub = events.hub
        self.static_peers = static_peers
        self.state_dir = Path(config.resolved_state_dir)
        self.resumed_from = resumed_from
        self.resumed_offline_step = resumed_offline_step
        self.started_at = time.time()
        self.transport = PeerTransport(core, on_frame=self._on_frame,
                                       on_link_up=self._on_link_up,
                                       on_link_down=self._on_link_down, health=health)
        self.transport.idle_timeout = max(10.0, 5 * config.heartbeat_interval)
        #: Closes web connections whose request headers do not come in time
        #: (node.common.connguard); the peer port's guard is the transport's.
        self.web_guard = ConnectionGuard()
        self._work = asyncio.Event()
        self._ckpt_wanted = asyncio.Event()
        self._timer_changed = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._failure: str | None = None
        executor.on_work = self._work.set
        executor.on_checkpoint = self._ckpt_wanted.set
        events.on_write = self._ckpt_wanted.set
        #: What the web API and dashboard may see and change (node.runtime.control).
        self.control = NodeControl(self)
        #: Pairing codes, pairing and the trust store, for the web API.
        self.pairing = Pairing(self, self.forget)
        #: The Host/Origin names the web API answers to (filled in once its port is bound).
        self.allowed_hosts: set[str] = set()
        self.web_port = 0
        self.peer_port = 0
        self._tg: asyncio.TaskGroup | None = None
        self._dials: dict[tuple[str, bytes | str | None], asyncio.Task[None]] = {}
        #: Builds the web application (node.web.api); replaced in tests.
        self.web_app_factory: Callable[[Node], web.Application] | None = None
        #: Runs mDNS discovery until cancelled (node.peers.discovery); replaced in tests.
        self.discovery_factory: Callable[[Node], Awaitable[None]] | None = None

    # -- views ------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    @property
    def state(self) -> str:
        """The node's state word, as shown in status and heartbeats."""
        return self.machine.phase.value

    @property
    def addresses(self) -> tuple[str, ...]:
        """The peer addresses this node announces."""
        return self.core.addresses

    def health_view(self) -> dict[str, Any]:
        """``{"state": "ok"|"degraded", "problems": {...}}`` (node.common.health)."""
        return self.health.as_json()

    def model_hash(self) -> str:
        """The digest of the model this node holds (its offline average when offline)."""
        return self.machine.base_digest.hex()

    def status(self) -> dict[str, Any]:
        """The object served at ``GET /api/status`` (node.runtime.status)."""
        from node.runtime.status import node_status

        return node_status(self)

    # -- supervision ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask ``run`` to stop gracefully (signal handlers call this)."""
        self._shutdown.set()
        self.executor.stop_training.set()

    def _fail(self, reason: str) -> None:
        """Stop the node cleanly because a task it cannot run without failed."""
        if self._failure is None:
            self._failure = reason
        self.request_shutdown()

    async def run(self) -> None:
        """Serve peers and the web API, and train, until shutdown is requested.

        Raises ``NodeFailed`` (one line, no traceback group) if a task the node cannot
        run without failed; ``OSError`` if a port cannot be bound."""
        peer_app = self.transport.app()

        async def pair(request: web.Request) -> web.StreamResponse:
            return await handle_pair_request(self, request)

        peer_app.router.add_get(PAIR_PATH, pair)
        peer_app.router.add_post(OLD_PAIR_PATH, old_pair_path)
        web_app = self._web_app()
        # Settle a web connection first thing, whatever the other middlewares answer.
        web_app.middlewares.insert(0, self.web_guard.middleware)
        peer_runner = web.AppRunner(peer_app, handle_signals=False, **server_options())
        web_runner = web.AppRunner(web_app, handle_signals=False, **server_options())
        await peer_runner.setup()
        await web_runner.setup()
        self.transport.guard.runner = peer_runner
        self.web_guard.runner = web_runner
        try:
            await self._bind(peer_runner, web_runner)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for key, address in self.static_peers:
                    self.dial(address, key)
                self._supervise(tg, "worker", self._worker, critical=True)
                self._supervise(tg, "checkpointer", self._checkpointer)
                self._supervise(tg, "timer", self._timer, critical=True)
                self._supervise(tg, "heartbeats", self._heartbeats)
                self._supervise(tg, "announcements", self._announcements)
                self._supervise(tg, "peer port guard", self.transport.guard.run)
                self._supervise(tg, "web port guard", self.web_guard.run)
                if self.config.mdns:
                    self._supervise(tg, "discovery", self._discovery)
                self.machine.start(now())
                self.after_input()
                await self._shutdown.wait()
                raise _Shutdown  # cancels the group's tasks
        except* _Shutdown:
            pass
        finally:
            self._tg = None
            self.executor.stop_training.set()
            await self.transport.close()
            await web_runner.cleanup()
            await peer_runner.cleanup()
            await asyncio.to_thread(self.events.flush)
            self.db.close()
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / ENDPOINT_FILE).unlink()
            log.info("node %s stopped", self.config.name)
        if self._failure is not None:
            raise NodeFailed(self._failure)

    async def _bind(self, peer_runner: web.AppRunner, web_runner: web.AppRunner) -> None:
        peer_site = web.TCPSite(peer_runner, self.config.host, self.config.port)
        await peer_site.start()
        web_site = web.TCPSite(web_runner, self.config.web_host, self.config.web_port)
        await web_site.start()
        self.peer_port = _bound_port(peer_runner)
        self.web_port = _bound_port(web_runner)
        self.allowed_hosts.update(allowed_hosts_for(self.config.web_host, self.web_port,
                                                    self.config.web_allowed_hosts))
        self.core.port = self.peer_port
        write_endpoint(self.state_dir, node_id=self.node_id, peer_port=self.peer_port,
                       web_port=self.web_port, web_host=self.config.web_host)
        log.info("node %s (%s) peer port %d, web http://%s:%d/", self.config.name,
                 self.node_id, self.peer_port, self.config.web_host, self.web_port)
        if self.trust.open:
            log.warning("--open: trusting every node of federation %r; for local demos"
                        " only", self.config.federation)
        self.core.addresses = advertised_addresses(self.config.host, self.peer_port)

    def _supervise(self, tg: asyncio.TaskGroup, name: str,
                   body: Callable[[], Awaitable[None]], *, critical: bool = False) -> None:
        """Run ``body`` in the task group under the failure policy (module docstring).

        A restarted task that runs ``RECOVERY_S`` seconds without failing again counts
        as recovered (health is ``ok`` again)."""

        async def supervised() -> None:
            delay = RESTART_DELAY
            while True:
                started = time.monotonic()
                recovery = None
                if name in self.health.problems:
                    count = self.health.problems[name].count
                    recovery = asyncio.get_running_loop().call_later(
                        RECOVERY_S, self._recovered_unless_failed, name, count)
                try:
                    await body()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 (the failure policy's one place)
                    if critical:
                        self.health.failed(name, exc, action="stopping the node")
                        self._fail(f"the {name} failed: {describe(exc)}")
                        return
                    self.health.failed(name, exc, action=f"restarting in {delay:.0f} s")
                finally:
                    if recovery is not None:
                        recovery.cancel()
                if time.monotonic() - started > RECOVERY_S:
                    delay = RESTART_DELAY  # it ran a good while: a fresh failure
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)

        tg.create_task(supervised(), name=name)

    def _recovered_unless_failed(self, name: str, count: int) -> None:
        problem = self.health.problems.get(name)
        if problem is not None and problem.count == count:
            self.health.recovered(name)

    # -- the worker: the executor's jobs, one at a time, off the loop -------------------

    async def _worker(self) -> None:
        """Run the executor's jobs one at a time, their blocking calls on a thread."""
        while True:
            queued = self.executor.next_job()
            if queued is None:
                self._work.clear()
                await self._work.wait()
                continue
            await self._run_job(queued)
            self.after_input()

    async def _run_job(self, queued: QueuedJob) -> None:
        try:
            await self._drive(queued.job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (the job's failure policy decides)
            self.executor.job_failed(queued, exc)
        else:
            self.executor.job_succeeded(queued)

    @staticmethod
    async def _drive(job: Job) -> None:
        """Run ``job`` to its end, each blocking call on a worker thread, its result or
        exception sent back into the job."""
        call = advance(job, first=True)
        while call is not None:
            try:
                result = await asyncio.to_thread(call.fn, *call.args)
            except asyncio.CancelledError:
                job.close()
                raise
            except Exception as exc:  # noqa: BLE001 (thrown into the job, which decides)
                call = advance(job, error=exc)
            else:
                call = advance(job, result)

    async def _checkpointer(self) -> None:
        """Write checkpoints and the event log on their own thread: never queued behind
        training, never on the event loop; retried while the disk refuses them."""
        while True:
            if self.health.problems.keys() & {"checkpoints", "event log"}:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CHECKPOINT_RETRY_S):
                        await self._ckpt_wanted.wait()
            else:
                await self._ckpt_wanted.wait()
            self._ckpt_wanted.clear()
            await asyncio.to_thread(self.events.flush)
            await self._drive(self.executor.write_checkpoints())

    # -- the loop's inputs: timer, heartbeats, announcements, discovery, links ---------

    def after_input(self) -> None:
        """Carry out the machine's actions, put frames on links, re-arm the timer."""
        self.executor.drain()
        for key in self.core.peers.take_drops():
            self._close_link(key)  # cut off for failed checks
        for key, frame in self.core.take_sends():
            if not self.transport.send(key, frame):
                log.debug("no link to %s: frame dropped", node_id_from_key(key))
        self._timer_changed.set()

    async def _timer(self) -> None:
        """Call ``machine.tick`` at its deadlines."""
        while True:
            deadline = self.machine.next_deadline()
            self._timer_changed.clear()
            timeout = None if deadline is None else max(0.0, deadline - now())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._timer_changed.wait()
                    continue
            self.machine.tick(now())
            self.after_input()

    async def _heartbeats(self) -> None:
        """Tell every peer our round and state, and measure RTT, once per interval."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            if self.transport.links:
                self.transport.broadcast(self.core.heartbeat(self.state))

    async def _announcements(self) -> None:
        """Gossip our announcement and expire silent relayed members, once per interval."""
        while True:
            self.core.announce(self.state)
            self.core.tick(now())
            self.after_input()
            await asyncio.sleep(self.config.announce_interval)

    async def _discovery(self) -> None:
        if self.discovery_factory is not None:
            await self.discovery_factory(self)
            return
        from node.peers.discovery import Discovery

        await Discovery(self).run()

    def _web_app(self) -> web.Application:
        if self.web_app_factory is not None:
            return self.web_app_factory(self)
        from node.web.api import build_web_app

        return build_web_app(self)

    async def _on_frame(self, link: Link, env: Envelope, frame: bytes | bytearray) -> None:
        self.core.dispatch(link.key, env, frame, now())
        msg = env.message
        if isinstance(msg, Heartbeat) and msg.echo_ts == 0:
            self.transport.send(link.key, self.core.heartbeat(self.state, echo_ts=msg.ping_ts))
        self.after_input()

    def _on_link_up(self, link: Link, hello: Hello, trust: str) -> None:
        self.core.link_up(link.key, hello, link.address, trust, now())
        self.after_input()
        self.hub.publish("peer_joined", {"node_id": node_id_from_key(link.key),
                                         "name": hello.name})

    def _on_link_down(self, link: Link) -> None:
        self.core.link_down(link.key, now())
        self.after_input()
        self.hub.publish("peer_left", {"node_id": node_id_from_key(link.key)})

    # -- links on request (discovery, pairing) ---------------------------------------

    def dial(self, address: str, key: bytes | str | None = None) -> None:
        """Keep a link to ``address`` (once per address), checking the key if one is given."""
        if self._tg is None or (address, key) in self._dials:
            return
        expected: Callable[[bytes], bool] | None = None
        if isinstance(key, bytes):
            expected = key.__eq__
        elif isinstance(key, str):
            expected = lambda k, want=key: node_id_from_key(k) == want  # noqa: E731
        # Keyed by address *and* expected key: another key announced at a known address
        # gets its own check (that is how an impostor is caught).
        self._dials[(address, key)] = self._tg.create_task(
            self.transport.dial(address, expected), name=f"dial {address}")

    def undial(self, address: str, key: bytes | str | None = None) -> None:
        """Stop keeping a link to ``address`` for ``key`` (a discovered node left)."""
        task = self._dials.pop((address, key), None)
        if task is not None:
            task.cancel()

    def discovered(self, key: bytes, name: str, address: str) -> None:
        """Discovery found ``key`` at ``address``: shown in status (trust unchanged)."""
        self.core.peers.note_discovered(key, name, address)

    def forget(self, key: bytes) -> None:
        """A paired key was removed from the trust store: stop trusting it now."""
        if self.core.peers.untrust(key, "paired"):
            self._close_link(key)

    def _close_link(self, key: bytes) -> None:
        link = self.transport.links.get(key)
        if link is not None and self._tg is not None:
            link.closed.set()
            self._tg.create_task(close_ws(link.ws), name="close link")


class _Shutdown(Exception):
    """Raised inside the task group to cancel its tasks on shutdown."""


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("site not bound")


def install_signal_handlers(node: Node) -> None:
    """SIGINT, SIGTERM and SIGHUP (its terminal closed) ask the node to shut down
    gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, node.request_shutdown)
