"""The pairing screen: the node's one-time pairing URI as a QR code and as text."""

from __future__ import annotations

import io

import qrcode
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from .source import PAIRING_TTL_S


def qr_text(data: str) -> str:
    """The QR code of ``data`` in Unicode half blocks, two modules per character row.

    Light modules are drawn, dark ones left blank: shown light on dark (as the pairing
    screen does) it scans like a printed code.
    """
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=2)
    code.add_data(data)
    code.make(fit=True)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue().rstrip("\n")


class PairingScreen(ModalScreen[None]):
    """A modal with the URI of a pairing offer and its QR code; Escape closes it."""

    DEFAULT_CSS = """
    PairingScreen { align: center middle; }
    PairingScreen > VerticalScroll {
        width: auto; max-width: 100%; height: auto; max-height: 100%;
        background: $surface; border: round $accent; padding: 0 1;
    }
    PairingScreen #pairing-qr { width: auto; color: white; background: black; }
    PairingScreen #pairing-uri, PairingScreen #pairing-help { width: 1fr; max-width: 80; }
    PairingScreen #pairing-help { color: $text-muted; }
    """

    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri

    def compose(self) -> ComposeResult:
        """The URI and what to do with it, then the code (scrolls in a small terminal)."""
        with VerticalScroll() as box:
            box.border_title = "pairing code"
            box.border_subtitle = "Escape closes"
            yield Static(self.uri, id="pairing-uri", markup=False)
            yield Static(f"One use, valid {PAIRING_TTL_S // 60} minutes. On the other node run"
                         " fl-node pair add 'URI', or scan:", id="pairing-help", markup=False)
            yield Static(qr_text(self.uri), id="pairing-qr")
