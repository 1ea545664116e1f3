"""The peer of the qemu migration test: an echo server and a line client, standard library only.

    python -m tests.vm.echo_peer server PORT
    python -m tests.vm.echo_peer client IDX DST PORT INTERVAL_MS DURATION_MS

It speaks the guest endpoint's line protocol (``tools/lab/guest_endpoint.c``: 32-byte
numbered lines, echoed byte for byte) and logs JSON lines in the lab endpoints' event
vocabulary, ``t`` on the machine's monotonic clock (the same in every namespace).  The
server logs the client's orderly close as ``closed`` (not a break: the
client closes only after its ``done``) and every chunk it receives (``rx``): the peer's longest stall is read from them.
"""
from __future__ import annotations

import json
import socket
import sys
import time

LINE = 32


def emit(**ev) -> None:
    ev["t"] = time.monotonic()
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def line_for(idx: int, seq: int) -> bytes:
    head = f"{idx} {seq} ".encode()
    pad = bytes(ord("a") + (seq + i) % 26 for i in range(len(head), LINE - 1))
    return head + pad + b"\n"


def server(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("", port))
    ls.listen(4)
    emit(ev="listening", port=port)
    conn, peer = ls.accept()  # one connection: the test's guest client
    emit(ev="saw", idx=0, side="server", address=peer[0], port=peer[1])
    total = 0
    while True:
        try:
            data = conn.recv(65536)
        except OSError as exc:
            emit(ev="broken", idx=0, side="server", err=type(exc).__name__, echoed=total)
            return
        if not data:
            emit(ev="closed", idx=0, side="server", echoed=total)  # the client's orderly close after its "done"
            return
        emit(ev="rx", idx=0, n=len(data))
        conn.sendall(data)
        total += len(data)


def client(idx: int, dst: str, port: int, interval: float, duration: float) -> None:
    s = socket.create_connection((dst, port), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    emit(ev="established", idx=idx, side="client", local=list(s.getsockname()), remote=[dst, port])
    s.settimeout(0.01)
    sent = answered = mismatches = 0
    buf = b""
    start = time.monotonic()
    next_send = start
    while True:
        now = time.monotonic()
        if now >= next_send and now < start + duration:
            s.sendall(line_for(idx, sent))
            sent += 1
            next_send += interval
        if now >= start + duration and answered == sent:
            break
        if now > start + duration + 20:
            emit(ev="broken", idx=idx, side="client", err="ETIMEDOUT", why="unanswered")
            return
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except OSError as exc:
            emit(ev="broken", idx=idx, side="client", err=type(exc).__name__)
            return
        if not data:
            emit(ev="broken", idx=idx, side="client", err="EOF")
            return
        buf += data
        while len(buf) >= LINE:
            got, buf = buf[:LINE], buf[LINE:]
            ok = got == line_for(idx, answered)
            mismatches += not ok
            emit(ev="answer", idx=idx, side="client", seq=answered, ok=ok)
            answered += 1
    emit(ev="done", idx=idx, side="client", sent=sent, answered=answered, bytes_sent=sent * LINE,
         bytes_echoed=answered * LINE + len(buf), mismatches=mismatches)
    s.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["server"] and len(a) == 2:
        server(int(a[1]))
    elif a[:1] == ["client"] and len(a) == 6:
        client(int(a[1]), a[2], int(a[3]), int(a[4]) / 1e3, int(a[5]) / 1e3)
    else:
        sys.exit(__doc__)
