"""An S3 server (moto) whose HTTP side can be stopped and restarted on the same port, for outage tests.

    python tests/restartable_s3.py PORT

prints `ok` once it serves on 127.0.0.1:PORT, then reads commands from stdin and answers `ok` after each:
- `stop`: stops serving, cuts every open connection (requests in flight get no answer, as when a server dies) and
  closes the listening socket; it checks that new connections are refused before answering;
- `start`: serves again on the same port.
End of stdin stops it. The objects live in this process's memory (moto has no persistent storage) and survive a
`stop`/`start`: this models an outage of the endpoint, not a loss of stored data.

It serves moto's WSGI app with moto's request handler, as `moto.server.ThreadedMotoServer` does, but that class's
`stop` is graceful (it waits for the requests in flight) and leaves closing the socket to werkzeug's serve loop;
this server tracks its connections so that `stop` can cut them, and closes the socket itself.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import ThreadedWSGIServer


class _Server(ThreadedWSGIServer):
    block_on_close = False  # server_close() must not wait for idle keep-alive handlers: stop() closes them

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):  # in the serve loop: every accepted connection
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connections.clear()


class RestartableS3:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.app = DomainDispatcherApplication(create_backend_app)  # one app: the same backends after a restart
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.server = _Server(self.host, self.port, self.app, handler=MotoRequestHandler)  # binds and listens
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()  # the serve loop accepts nothing more
        self.thread.join()
        self.server.close_connections()
        self.server.server_close()  # the listening socket: connections are refused from now on
        self.server = None
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except ConnectionRefusedError:
            return
        raise RuntimeError(f"{self.host}:{self.port} still accepts connections after stop")


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = RestartableS3("127.0.0.1", int(sys.argv[1]))
    server.start()
    print("ok", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stop" and server.server is not None:
            server.stop()
        elif command == "start" and server.server is None:
            server.start()
        else:
            print(f"error: {command!r} (the server is {'up' if server.server else 'down'})", flush=True)
            continue
        print("ok", flush=True)
    if server.server is not None:
        server.stop()


if __name__ == "__main__":
    main()
