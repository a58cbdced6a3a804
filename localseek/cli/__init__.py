"""Command-line interface: one module per command; they parse arguments and render."""
