"""The dashboard in a real browser (headless Chromium) against a real node, and the control
plane's security matrix against the same real node process.

- Live updates: the page follows the node's rounds over its WebSocket without reloading,
  and its charts fill in. The test saves a full-page screenshot: ``dashboard.png`` in the
  test's ``tmp_path``, and also into the directory named by the environment variable
  ``FL_NODE_TEST_ARTIFACTS`` when it is set (CI uploads that directory), so a reviewer can
  see what the page looked like.
- Start and stop buttons: they really stop and resume the node's rounds.
- Security matrix (no browser, plain HTTP and aiohttp): every mutating call (POST
  /api/config, /api/start, /api/stop; ``start`` and ``stop`` over /ws) with no token, a
  wrong token, a foreign Host header or a foreign Origin header is refused and changes
  nothing (state, configuration, event log); a positive control per call, with the right
  token, shows that the same checks do see a change.

Chromium is /usr/bin/chromium (scripts/system-deps installs it); Playwright drives it and is
never asked to download a browser of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from node.cli.demo import get_json

from .cluster import Cluster, NodeProc, poll_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Chromium at /usr/bin/chromium (scripts/system-deps)"),
]

#: A single node that trains on its own for a while (a round takes ~0.1-0.5 s).
TRAINING = ("--dataset", "digits", "--rounds", "1000", "--local-epochs", "1", "--min-peers", "0")
VIEWPORT = {"width": 1280, "height": 900}
#: Generous: the machine may be a loaded 2-core box.
WAIT_S = 90.0
PAGE_TIMEOUT_MS = 90_000
#: How long a refused request gets to show an effect it must not have.
OBSERVE_S = 1.5
#: How long a stopped node must not complete a round.
STOPPED_S = 2.5
#: Event-log kinds that the control calls write.
CONTROL_KINDS = frozenset({"training_started", "training_stopped", "config_changed"})
ARTIFACTS_ENV = "FL_NODE_TEST_ARTIFACTS"


def token_of(node: NodeProc) -> str:
    return (node.state_dir / "api.token").read_text().strip()


def wait(node: NodeProc, pred: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    poll_until(pred, timeout, what, [node])


# -- the browser ----------------------------------------------------------------------


@pytest.fixture
def web_node(tmp_path: Path) -> Iterator[NodeProc]:
    with Cluster(tmp_path / "nodes") as cluster:
        yield cluster.start("web", *TRAINING)


@contextlib.contextmanager
def open_page(node: NodeProc):  # noqa: ANN201 (yields a playwright Page)
    """A Chromium page (1280x900) on ``node``'s dashboard, token in the URL fragment.

    Collects page errors (uncaught exceptions) and console errors in ``page.problems``.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport=VIEWPORT)
            pg.set_default_timeout(PAGE_TIMEOUT_MS)
            problems: list[str] = []
            pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                  if msg.type == "error" else None)
            pg.problems = problems
            pg.goto(f"http://127.0.0.1:{node.web_port}/#token={token_of(node)}",
                    wait_until="load")
            yield pg
        finally:
            browser.close()


@pytest.fixture
def page(web_node: NodeProc):  # noqa: ANN201 (a playwright Page)
    """The dashboard of ``web_node`` (set up after it, so closed before the node stops)."""
    with open_page(web_node) as pg:
        yield pg


def dom_round(page) -> int:  # noqa: ANN001
    return int(page.get_attribute("#round", "data-round"))


def test_page_updates_live_without_reload(web_node: NodeProc, page,  # noqa: ANN001
                                          tmp_path: Path) -> None:
    page.evaluate("window.__loaded_marker = 1")
    page.wait_for_function("() => document.getElementById('conn').dataset.state === 'live'")
    # The token left the address bar, and no token form is shown.
    assert "token" not in page.url
    assert page.is_hidden("#token-form")
    first = dom_round(page)
    page.wait_for_function(
        "n => Number(document.getElementById('round').dataset.round) >= n", arg=first + 2)
    page.wait_for_function(
        "() => /^\\d+(\\.\\d+)? %/.test(document.getElementById('accuracy').textContent)")
    page.wait_for_function(
        "() => ['acc-chart', 'loss-chart'].every("
        "id => Number(document.getElementById(id).dataset.points) >= 2)")

    shown = dom_round(page)
    assert shown >= first + 2
    assert web_node.status()["round"] >= shown  # the page shows the node's real progress
    assert page.evaluate("window.__loaded_marker") == 1, "the page was reloaded"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    for chart in ("#acc-chart", "#loss-chart"):
        assert int(page.get_attribute(chart, "data-points")) >= 2, chart
    accuracy = page.text_content("#accuracy")
    assert 0.0 <= float(accuracy.split("%")[0]) <= 100.0, accuracy
    assert page.get_attribute("#conn", "data-state") == "live"
    assert page.is_hidden("#privacy")  # no differential privacy on this node
    assert not page.problems, page.problems

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    height = page.evaluate("document.documentElement.scrollHeight")
    artifacts = os.environ.get(ARTIFACTS_ENV)
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(artifacts) / "dashboard.png")
    assert shot.stat().st_size > 20_000, shot.stat().st_size
    with Image.open(shot) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width == VIEWPORT["width"]
        # full page: at least the viewport, about the document's height (it may grow a
        # little between the shot and the measurement, as events arrive)
        assert VIEWPORT["height"] <= img.height <= height + 50, (img.size, height)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "an (almost) blank screenshot"


def test_start_and_stop_buttons(web_node: NodeProc, page) -> None:  # noqa: ANN001
    page.wait_for_function("() => document.getElementById('conn').dataset.state === 'live'")
    wait(web_node, lambda: web_node.status()["round"] >= 2, "the node to train")

    # The newest event on the page now: new events are added above it, not redrawn.
    page.wait_for_function("() => document.querySelector('#events li .kind') !== null")
    page.evaluate("window.__oldTop = document.querySelector('#events li')")
    page.click("#stop")
    wait(web_node, lambda: web_node.status()["state"] == "stopped", "state stopped")
    stopped_at = web_node.status()["round"]
    deadline = time.monotonic() + STOPPED_S
    while time.monotonic() < deadline:  # the rounds stay where they are
        status = web_node.status()
        assert (status["state"], status["round"]) == ("stopped", stopped_at), status
        time.sleep(0.1)
    page.wait_for_function("() => document.getElementById('state').dataset.state === 'stopped'")
    assert page.text_content("#state").strip() == "stopped"
    assert page.text_content("#control-error").strip() == ""
    # The event log: the node's own newest events (at most 100), newest first, the stop
    # among them; the items already shown stayed (no redraw of the whole list per event).
    def log_as_logged() -> list[list[str]] | None:
        shown = page.evaluate("[...document.querySelectorAll('#events li')].map("
                              "li => [li.querySelector('.kind').textContent,"
                              " li.querySelector('.detail').textContent])")
        logged = get_json(web_node.web_port, "/api/events?limit=100")["events"]
        return shown if shown == [[e["kind"], e["detail"] or "—"]
                                  for e in reversed(logged)] else None

    shown = poll_until(log_as_logged, 30, "the page's event log to be the node's")
    assert "training_stopped" in [kind for kind, _ in shown[:10]], shown[:10]
    assert page.evaluate("window.__oldTop.isConnected"), "the event list was redrawn whole"

    page.click("#start")
    wait(web_node, lambda: web_node.status()["state"] != "stopped", "state not stopped")
    wait(web_node, lambda: web_node.status()["round"] >= stopped_at + 2, "rounds again")
    page.wait_for_function(
        "n => Number(document.getElementById('round').dataset.round) >= n", arg=stopped_at + 2)
    page.wait_for_function("() => document.getElementById('state').dataset.state !== 'stopped'")
    assert page.text_content("#control-error").strip() == ""
    assert not page.problems, page.problems


# -- the security matrix --------------------------------------------------------------

FAULTS = ("no-token", "wrong-token", "foreign-host", "foreign-origin")
#: What each fault must get: 401 without the right token, 403 for a foreign Host/Origin.
FAULT_STATUS = {"no-token": 401, "wrong-token": 401, "foreign-host": 403,
                "foreign-origin": 403}
#: method -> (whether the node must be running before the attempt, what the call does)
METHODS = {
    "rest-config": (True, "config"),
    "rest-start": (False, "start"),
    "rest-stop": (True, "stop"),
    "ws-start": (False, "start"),
    "ws-stop": (True, "stop"),
}
NEW_LR = 0.001


def test_the_page_shows_the_privacy_budget_of_a_dp_node(tmp_path: Path) -> None:
    """A node training with Opacus DP-SGD: the page shows the epsilon it has spent (the
    ledger's figure from status), follows it as it grows, and shows the target, delta and
    a meter; a stopped node's figure is shown exactly."""
    with Cluster(tmp_path / "nodes") as cluster:
        node = cluster.start("private", *TRAINING, "--dp", "--target-epsilon", "8")
        wait(node, lambda: (node.status().get("privacy") or {}).get("epsilon", 0) > 0,
             "some epsilon spent")
        with open_page(node) as pg:
            pg.wait_for_function(
                "() => !document.getElementById('privacy').hidden"
                " && /^\\d+\\.\\d{3} of 8$/.test(document.getElementById('epsilon').textContent)")
            shown = float(pg.text_content("#epsilon").split()[0])
            assert 0 < shown <= node.status()["privacy"]["epsilon"] + 0.0005 < 8
            # it follows the node as training spends more
            pg.wait_for_function(
                "e => Number(document.getElementById('epsilon').textContent.split(' ')[0]) > e",
                arg=shown)
            # stopped, the figure holds still: the page shows exactly the node's own
            set_running(node, token_of(node), False)
            privacy = node.status()["privacy"]
            pg.wait_for_function(
                "t => document.getElementById('epsilon').textContent === t",
                arg=f"{privacy['epsilon']:.3f} of 8")
            meter = pg.evaluate("(m => [m.value, m.max])(document.getElementById('epsilon-meter'))")
            assert meter == [pytest.approx(privacy["epsilon"]), 8]
            assert float(pg.text_content("#delta")) == pytest.approx(privacy["delta"])
            assert not pg.problems, pg.problems


@pytest.fixture(scope="module")
def sec_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One real node for the whole matrix; enough rounds that it never finishes."""
    with Cluster(tmp_path_factory.mktemp("security")) as cluster:
        node = cluster.start("guarded", "--dataset", "digits", "--rounds", "100000",
                             "--local-epochs", "1", "--min-peers", "0")
        wait(node, lambda: node.status()["round"] >= 1, "the first round")
        yield node


def wrong_token(token: str) -> str:
    """As long as the right one, differing in its last character."""
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def rest_post(port: int, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    """POST with exactly these headers (http.client keeps a Host header we give it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        conn.request("POST", path, body=data,
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    with contextlib.suppress(ValueError):
        return resp.status, json.loads(raw)
    return resp.status, raw


def fault_headers(fault: str, port: int, token: str) -> dict[str, str]:
    """The request headers of one cell: the right token unless the fault is the token."""
    headers = {"Authorization": f"Bearer {token}"}
    if fault == "no-token":
        del headers["Authorization"]
    elif fault == "wrong-token":
        headers["Authorization"] = f"Bearer {wrong_token(token)}"
    elif fault == "foreign-host":
        headers["Host"] = f"evil.example:{port}"
    elif fault == "foreign-origin":
        headers["Origin"] = "http://evil.example"
    return headers


async def ws_session(port: int, action: str, fault: str | None, token: str,
                     want_state: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Open /ws with one cell's fault (None: none), send ``action``, collect what comes back.

    A refused upgrade gives ``{"handshake": status}``. Otherwise the client sends its
    messages at once, without waiting for answers (so a server that wrongly accepted
    them would act on them), then reads until the socket closes or, with ``want_state``,
    until a status update whose state satisfies it.
    """
    headers: dict[str, str] = {}
    if fault == "foreign-host":
        headers["Host"] = f"evil.example:{port}"
    elif fault == "foreign-origin":
        headers["Origin"] = "http://evil.example"
    if fault == "no-token":
        outgoing = [{"type": action}]
    elif fault == "wrong-token":
        outgoing = [{"type": "auth", "token": wrong_token(token)}, {"type": action}]
    else:
        outgoing = [{"type": "auth", "token": token}, {"type": action}]
    async with asyncio.timeout(60), aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws", headers=headers,
                                          autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            return {"handshake": exc.status, "messages": [], "close_code": None}
        messages: list[dict[str, Any]] = []
        async with ws:
            for msg in outgoing:
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    await ws.send_json(msg)
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break  # closed (or an error)
                messages.append(json.loads(msg.data))
                last = messages[-1]
                if (want_state is not None and last.get("type") == "status_update"
                        and want_state(last["data"]["state"])):
                    break
        return {"handshake": 101, "messages": messages, "close_code": ws.close_code}


def snapshot(node: NodeProc) -> dict[str, Any]:
    """Everything a control call could change: state, round, configuration, event log."""
    status = node.status()
    return {
        "state": status["state"],
        "round": status["round"],
        "config": get_json(node.web_port, "/api/config")["config"],
        "events": get_json(node.web_port, "/api/events?limit=1000")["events"],
    }


def changes(before: dict[str, Any], after: dict[str, Any], since: float) -> list[str]:
    """What changed between two snapshots, as far as a control call is concerned.

    A stopped node must stay exactly as it was (state, rounds, the whole event log). A
    running node changes its state word and logs every round, so there: it must not have
    become stopped, and no control event may have been logged at or after ``since``.
    Either way the configuration must be the same.
    """
    found = []
    if before["config"] != after["config"]:
        keys = sorted(k for k in {*before["config"], *after["config"]}
                      if before["config"].get(k) != after["config"].get(k))
        found.append("config: " + ", ".join(
            f"{k} {before['config'].get(k)!r} -> {after['config'].get(k)!r}" for k in keys))
    if before["state"] == "stopped":
        if (after["state"], after["round"]) != ("stopped", before["round"]):
            found.append(f"state stopped at round {before['round']} -> {after['state']}"
                         f" at round {after['round']}")
        if after["events"] != before["events"]:
            found.append(f"event log: {[e for e in after['events'] if e not in before['events']]}")
    else:
        if after["state"] == "stopped":
            found.append(f"state {before['state']} -> stopped")
        new = [e for e in after["events"] if e["kind"] in CONTROL_KINDS and e["ts"] >= since]
        if new:
            found.append(f"control events: {new}")
    return found


def set_running(node: NodeProc, token: str, running: bool) -> dict[str, Any]:
    """Bring the node to running or stopped with the right token; return a settled snapshot."""
    auth = {"Authorization": f"Bearer {token}"}
    status, body = rest_post(node.web_port, "/api/start" if running else "/api/stop", None, auth)
    assert status == 200, (status, body)
    if running:
        start_round = node.status()["round"]
        wait(node, lambda: node.status()["round"] > start_round, "a round after start")
        return snapshot(node)
    wait(node, lambda: node.status()["state"] == "stopped", "state stopped")
    # settled: the log and rounds no longer move (a step in flight has finished)
    previous: list[dict[str, Any]] = [snapshot(node)]

    def settled() -> bool:
        time.sleep(0.5)
        now = snapshot(node)
        same, previous[0] = now == previous[0], now
        return same

    wait(node, settled, "a stopped node to settle")
    return previous[0]


def restore_lr(node: NodeProc, token: str, lr: float) -> None:
    status, body = rest_post(node.web_port, "/api/config", {"lr": lr},
                             {"Authorization": f"Bearer {token}"})
    assert status == 200, (status, body)


def attempt(node: NodeProc, method: str, fault: str | None, token: str) -> dict[str, Any]:
    """Make one mutating call with one fault (None: a correct call); say what came back."""
    port = node.web_port
    running, action = METHODS[method]
    if method.startswith("rest-"):
        headers = (fault_headers(fault, port, token) if fault
                   else {"Authorization": f"Bearer {token}"})
        body = {"lr": NEW_LR} if action == "config" else None
        status, answer = rest_post(port, f"/api/{action}", body, headers)
        return {"status": status, "answer": answer}
    want = None
    if fault is None:
        want = (lambda s: s != "stopped") if action == "start" else (lambda s: s == "stopped")
    return asyncio.run(ws_session(port, action, fault, token, want))


def assert_refused(method: str, fault: str, result: dict[str, Any]) -> None:
    expected = FAULT_STATUS[fault]
    if method.startswith("rest-"):
        assert result["status"] == expected, result
        return
    if expected == 403:  # refused before the upgrade
        assert result["handshake"] == 403, result
        return
    assert result["handshake"] == 101, result
    assert result["messages"] == [{"type": "error", "error": "unauthorized"}], result
    assert result["close_code"] == 4401, result


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("method", list(METHODS))
def test_refused_calls_change_nothing(sec_node: NodeProc, method: str, fault: str) -> None:
    token = token_of(sec_node)
    running, _ = METHODS[method]
    before = set_running(sec_node, token, running)
    since = time.time()
    result = attempt(sec_node, method, fault, token)
    assert_refused(method, fault, result)
    # Nothing changes, now or a moment later.
    deadline = time.monotonic() + OBSERVE_S
    while True:
        found = changes(before, snapshot(sec_node), since)
        assert not found, f"{method} with {fault} was refused ({result}) but changed: {found}"
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if running:  # and a running node still runs
        at = sec_node.status()["round"]
        wait(sec_node, lambda: sec_node.status()["round"] > at, "rounds to continue")


@pytest.mark.parametrize("method", list(METHODS))
def test_positive_control_with_the_right_token(sec_node: NodeProc, method: str) -> None:
    """The same call and the same checks, with the right token: the change is seen."""
    token = token_of(sec_node)
    running, action = METHODS[method]
    before = set_running(sec_node, token, running)
    lr = before["config"]["lr"]
    since = time.time()
    try:
        result = attempt(sec_node, method, None, token)
        if method.startswith("rest-"):
            assert result["status"] == 200, result
        else:
            assert result["handshake"] == 101, result
            assert result["messages"][0]["type"] == "hello", result
            assert not [m for m in result["messages"] if m.get("type") == "error"], result
        expected_kind = {"config": "config_changed", "start": "training_started",
                         "stop": "training_stopped"}[action]

        def seen() -> bool:
            after = snapshot(sec_node)
            found = changes(before, after, since)
            kinds = {e["kind"] for e in after["events"] if e["ts"] >= since}
            if action == "config":
                ok = after["config"]["lr"] == NEW_LR
            elif action == "start":
                ok = after["state"] != "stopped"
            else:
                ok = after["state"] == "stopped"
            return bool(found) and ok and expected_kind in kinds

        wait(sec_node, seen, f"{method} to take effect")
    finally:
        if action == "config":
            restore_lr(sec_node, token, lr)
