"""Helpers for tests that signal a CLI process."""

import signal


def default_signals() -> None:
    """A child's preexec_fn: SIGINT, SIGHUP and SIGTERM back to their defaults, so that the
    test holds when the suite itself runs with them ignored (under nohup, or as a background
    job, which ignores SIGINT): the CLI rightly keeps a signal its parent ignored."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)
