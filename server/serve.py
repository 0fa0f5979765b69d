"""Runs the server: uvicorn with uvloop + httptools, one or many worker processes.

TCP_NODELAY is set on every accepted connection by our protocol class. Without it, small JSON answers
on a keep-alive connection can sit in the kernel waiting for the client's delayed ACK (~40 ms per
request); it matters most when uvicorn runs several workers from an inherited socket.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.config import CONFIG_ENV, ServerConfig
from server.store.uri import redact


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)


def configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def serve(config: ServerConfig) -> None:
    configure_logging(config.log_level)
    logging.getLogger("runyard.server").info(
        "serving backend %s, artifacts %s on http://%s:%d (%d worker%s)",
        redact(config.backend_store_uri), redact(config.artifact_root), config.host, config.port,
        config.workers, "" if config.workers == 1 else "s")
    os.environ[CONFIG_ENV] = config.to_env()
    if config.expose_prometheus:
        from server.prometheus import prepare_directory

        prepare_directory(config.expose_prometheus)  # before the workers start: they inherit its path
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        loop="uvloop",
        http=NoDelayHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        log_level=config.log_level,
        timeout_keep_alive=30,
        server_header=False,
    )
