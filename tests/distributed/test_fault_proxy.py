"""The partition proxy itself, against a loopback echo server: bytes flow, a partition
holds them (both ways) until it heals, a reset closes every connection, and it refuses
to proxy anything but loopback; it names its sessions as the server sees them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.distributed.faults import FaultProxy
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_partition_holds_bytes_until_heal_and_reset_closes(echo_port: int) -> None:
    proxy = FaultProxy(echo_port)
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"one")
        assert client.recv(16) == b"one"
        proxy.partition()
        client.sendall(b"two")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(16)  # held, not lost
        proxy.heal()
        client.settimeout(5)
        assert client.recv(16) == b"two"
        proxy.reset()
        assert client.recv(16) == b""  # closed by the proxy
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"three")
        assert again.recv(16) == b"three"  # new connections work after a reset
        again.close()
        client.close()
    finally:
        proxy.close()


def test_urls_point_at_the_proxy_and_only_loopback_is_proxied(echo_port: int) -> None:
    proxy = FaultProxy(echo_port)
    try:
        assert proxy.url_for("redis://127.0.0.1:6379/3") == f"redis://127.0.0.1:{proxy.port}/3"
        assert proxy.url_for("postgresql+psycopg://postgres@127.0.0.1:5432/db") == (
            f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/db"
        )
    finally:
        proxy.close()
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(80, target_host="192.0.2.1")


def test_server_side_addresses_name_the_proxied_sessions_as_the_server_sees_them() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    proxy = FaultProxy(server.getsockname()[1])
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        conn, (host, port) = server.accept()
        assert wait_until(proxy.server_side_addresses, 5) == {f"{host}:{port}"}
        conn.close()
        client.close()
    finally:
        proxy.close()
        server.close()
