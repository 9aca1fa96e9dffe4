"""fl-node's terminal dashboard (Textual): ``tui.app.run_tui(url, token)``, or
``python -m tui --demo`` to look at it without a node."""
