"""The server process of ``medadapt label``: MONAI Label's ``start_server`` with bounded connections.

Run as ``python -m medadapt.monailabel.launch start_server ARGS`` (MONAI Label's own arguments)
by `medadapt.monailabel.cli`. It is MONAI Label's ``monailabel.main`` with uvicorn started
differently:

- every connection must send its request head (request line and headers) within
  `HEADER_TIMEOUT` seconds of opening or of starting the head, and an idle keep-alive
  connection is closed after `KEEP_ALIVE_TIMEOUT` seconds (`DeadlineH11Protocol`): idle and
  half-sent connections no longer hold the server's connection slots for as long as a client
  likes (uvicorn waits for a head without end);
- on SIGTERM or SIGINT uvicorn stops taking requests and gives those in flight
  `SHUTDOWN_GRACE` seconds; the process also gets SIGTERM when the ``medadapt label`` process
  that started it dies (Linux), so it never serves on as an orphan.

Request bodies are bounded by the app's request guard (`medadapt.monailabel.server`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import h11
import uvicorn
from monailabel.main import Main
from monailabel.utils.others.generic import init_log_config
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # s to send a request's head
KEEP_ALIVE_TIMEOUT = 5.0  # s an idle keep-alive connection is kept (uvicorn's default)
SHUTDOWN_GRACE = 10.0  # s for requests in flight when the server is told to stop
PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies
PARENT_ENV = "MEDADAPT_LABEL_PARENT"  # the pid of the `medadapt label` process that started this one
UVICORN_ARGS = ("host", "port", "root_path", "log_level", "access_log", "ssl_keyfile", "ssl_certfile",
                "ssl_keyfile_password", "ssl_ca_certs", "limit_concurrency")


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive within
    `HEADER_TIMEOUT` seconds: from the connection's start (idle clients) or from the first
    byte of a head (slow clients). The time to send a body is bounded by the request guard."""

    head_timeout = HEADER_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the next request
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Arm the head deadline while part of a head is waiting; disarm it once it arrived."""
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()  # the head arrived: the request guard bounds the body
        elif self.conn.trailing_data[0] and self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head within %g s", self.head_timeout)
            self.transport.close()


class BoundedMain(Main):
    """MONAI Label's command line, its server started with the bounds above."""

    def action_start_server(self, args) -> None:
        self.start_server_validate_args(args)
        self.start_server_init_settings(args)
        log_config = init_log_config(args.log_config, args.app, "app.log", args.verbose)
        if args.dryrun:
            return
        # MONAI Label's own settings, as its start_server passes them (one worker: the app keeps state).
        passed = {name: getattr(args, name) for name in UVICORN_ARGS}
        uvicorn.run(args.uvicorn_app, log_config=log_config, use_colors=True, http=DeadlineH11Protocol,
                    timeout_keep_alive=KEEP_ALIVE_TIMEOUT, timeout_graceful_shutdown=SHUTDOWN_GRACE, **passed)


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (``medadapt label``) dies, and
    stop at once if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the parent's own signal handlers still stop this process
    if os.getppid() != int(os.environ.get(PARENT_ENV) or os.getppid()):
        sys.exit(1)


if __name__ == "__main__":
    die_with_parent()
    BoundedMain().run()
