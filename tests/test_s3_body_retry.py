"""A response body cut off mid-read (connection dropped after the headers) is retried by `S3Store.read`:
botocore's own retries end once the headers arrive. A loopback TCP proxy in front of the moto S3 server forwards
everything, except that it drops the connection halfway through the first `cuts` GET responses for one key."""

from __future__ import annotations

import logging
import socket
import threading

import boto3
import pytest

from data_pipeline.object_store import open_store


class CuttingProxy:
    def __init__(self, upstream_port: int, marker: bytes, cuts: int):
        self.upstream_port, self.marker, self.cuts = upstream_port, marker, cuts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"cut": False}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, state), daemon=True).start()

    def _requests(self, src, dst, state) -> None:
        while data := _recv(src):
            if data.startswith(b"GET ") and self.marker in data.split(b"\r\n", 1)[0] and self.cuts > 0:
                self.cuts -= 1
                state["cut"] = True  # this connection's next response is cut in half
            dst.sendall(data)
        _close(src, dst)

    def _responses(self, src, dst, state) -> None:
        headers_sent = False
        while data := _recv(src):
            if state["cut"]:
                if not headers_sent:  # the headers go through whole: botocore's retries are over
                    end = data.find(b"\r\n\r\n")
                    if end < 0:
                        dst.sendall(data)
                        continue
                    headers_sent = True
                    dst.sendall(data[: end + 4])
                    data = data[end + 4:]
                    if not data:
                        continue
                dst.sendall(data[: len(data) // 2])  # then half a chunk of the body, and the connection drops
                break
            dst.sendall(data)
        _close(src, dst)

    def close(self) -> None:
        self.listener.close()


def _recv(sock) -> bytes:
    try:
        return sock.recv(1 << 20)
    except OSError:
        return b""


def _close(*socks) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.mark.parametrize("cuts, recovers", [(2, True), (4, False)])
def test_a_cut_off_body_is_retried(s3_endpoint, caplog, cuts, recovers):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=f"cut{cuts}")
    payload = bytes(range(256)) * 4096  # 1 MiB
    open_store(f"s3://cut{cuts}/x", s3_endpoint).write("shard.tar", payload)
    proxy = CuttingProxy(int(s3_endpoint.rsplit(":", 1)[1]), b"shard.tar", cuts)
    try:
        store = open_store(f"s3://cut{cuts}/x", f"http://127.0.0.1:{proxy.port}")
        with caplog.at_level(logging.WARNING):
            if recovers:  # 2 cut responses, then a whole one: the bytes are exact
                assert store.read("shard.tar", 1000, 600_000) == payload[1000:600_000]
                assert caplog.text.count("shard.tar: response cut off") == 2
            else:  # BODY_ATTEMPTS = 4 cut responses in a row: the error reaches the caller
                with pytest.raises(Exception, match="(?i)incomplete|connection|read"):
                    store.read("shard.tar")
        assert proxy.cuts == 0
    finally:
        proxy.close()
