"""The ``blockbackup`` command line (the parser and its dispatch are in ``cli.app``)."""

from __future__ import annotations

import sys

from blockbackup.cli.exitcodes import EXIT_INTERRUPTED

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The console script: start-up (loading the modules, parsing the options), then the
    command.

    A Ctrl-C during start-up kills the process at once, by the signal itself (the shell
    says 130), as for any program that has not begun: there is nothing to undo yet.
    Python's own handling raises KeyboardInterrupt wherever the interpreter is, and loses
    it when that is a finalizer or a weakref callback: every import runs one, for its
    module lock (stderr: ``Exception ignored in: ... KeyboardInterrupt``). The command
    then ran as if no Ctrl-C had come: ``jobs`` waited its whole --timeout for a monitor.

    The command itself gets Python's handling back: KeyboardInterrupt, exit 130 here,
    unless it installs its own (the QMP commands: ``qmpclient.run_command``). SIGTERM and
    SIGHUP keep the system's default until then: they kill, whatever Python is running.
    """
    try:
        import signal  # here, not above: a Ctrl-C while it loads is caught below

        startup = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if startup:  # else SIGINT is ignored (a background job of a script): leave it so
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            from blockbackup.cli.app import command  # lazy: loading it is start-up too

            run = command(argv)
        finally:
            if startup:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        return run()
    except KeyboardInterrupt:
        print("blockbackup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
