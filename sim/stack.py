"""A small TCP/UDP endpoint model that behaves as Linux does where survival depends on it.

Each simulated machine (VM, peer, host) has a :class:`Stack`.  TCP sockets do a
three-way handshake, send request/response data stop-and-wait with retransmission,
answer segments of unknown connections with RST, and give up when a segment stays
unacknowledged longer than the timeout (TCP_USER_TIMEOUT).  The timers are Linux's
(``sim.linux``: RTT-based RTO with its 200 ms floor, back-off, linear SYN timeouts, the
last timer clamped to the user timeout).  ICMP errors are read as ``tcp_v4_err`` and
``__udp4_lib_err`` read them: a hard error in SYN_SENT ends the connect, on an established
connection an error is reported to the application and never ends it by itself (RFC 1122
4.2.3.9), and net/host unreachable undoes one back-off step (RFC 6069).  A UDP datagram to
a closed port is answered with ICMP port unreachable (rate-limited as Linux does).
Everything a stack sends is a real IPv4 packet (``conntrack.build``) and everything it
reads is parsed by ``conntrack.parse_ip``.

What an application learns from its socket (an error read, a break) is written down for
the one judge as its observation; a stack never looks at where the network lost a packet.

The socket states are one IntEnum and one transition table, here.
"""
from __future__ import annotations

import errno as _errno
from enum import IntEnum
from typing import TYPE_CHECKING, Callable

from conntrack import ParseError, Proto, TcpFlag, build, parse_ip

from . import linux
from .judge import Observation, Seen
from .linux import Rto, clamp_to_user_timeout
from .wire import zeros
from .world import Clock, Loss

if TYPE_CHECKING:
    from .connection import Connection

SYN, ACK, RST, PSH = int(TcpFlag.SYN), int(TcpFlag.ACK), int(TcpFlag.RST), int(TcpFlag.PSH)
_M32 = 0xFFFFFFFF
RTO_INITIAL, RTO_MIN, RTO_MAX = linux.TCP_TIMEOUT_INIT, linux.TCP_RTO_MIN, linux.TCP_RTO_MAX


class SockState(IntEnum):
    SYN_SENT = 1
    SYN_RCVD = 2
    ESTABLISHED = 3
    RESET = 4  # killed by an acceptable RST (or refused: ECONNREFUSED)
    TIMED_OUT = 5  # gave up retransmitting
    FAILED = 6  # ended by an error: a hard ICMP error in SYN_SENT, no route, or one the application gave up on


class SockEvent(IntEnum):
    SYNACK_OK = 1  # SYN-ACK acknowledging our SYN
    ACK_OK = 2  # ACK completing the handshake (or data with it)
    RST_OK = 3  # an acceptable RST
    GIVE_UP = 4  # retransmission timeout exceeded
    ERROR = 5  # a hard error ends the connect (``tcp_v4_err`` -> ``tcp_done``), or the application closes on one


_S, _E = SockState, SockEvent
#: TRANSITIONS[state][event] -> next state; anything missing is a bug in the model.
TRANSITIONS: dict[SockState, dict[SockEvent, SockState]] = {
    _S.SYN_SENT: {_E.SYNACK_OK: _S.ESTABLISHED, _E.RST_OK: _S.RESET, _E.GIVE_UP: _S.TIMED_OUT,
                  _E.ERROR: _S.FAILED},
    _S.SYN_RCVD: {_E.ACK_OK: _S.ESTABLISHED, _E.RST_OK: _S.RESET, _E.GIVE_UP: _S.TIMED_OUT,
                  _E.ERROR: _S.FAILED},
    _S.ESTABLISHED: {_E.RST_OK: _S.RESET, _E.GIVE_UP: _S.TIMED_OUT, _E.ERROR: _S.FAILED},
    _S.RESET: {},
    _S.TIMED_OUT: {},
    _S.FAILED: {},
}
_LIVE = (_S.SYN_SENT, _S.SYN_RCVD, _S.ESTABLISHED)


def _after(a: int, b: int) -> bool:
    """Sequence number ``a`` is after ``b`` (modulo 2**32)."""
    return 0 < ((a - b) & _M32) < 0x80000000


def _between(seq: int, lo: int, hi: int) -> bool:
    """``between()`` of include/net/tcp.h: lo <= seq <= hi, modulo 2**32."""
    return ((hi - lo) & _M32) >= ((seq - lo) & _M32)


def _observe(conn: "Connection | None", now: float, client: bool, seen: Seen) -> None:
    """An application's observation of its own socket, for the judge (whose endpoint: the VM's or the peer's)."""
    if conn is not None:
        by = "vm" if client == (conn.spec.direction == "outbound") else "peer"
        conn.seen.append(Observation(now, seen, by))


class TcpSock:
    __slots__ = ("stack", "local", "lport", "remote", "rport", "state", "snd_una", "snd_nxt", "rcv_nxt",
                 "out_seq", "out_len", "out_flags", "out_first", "out_sent", "retransmitted", "queue",
                 "rtt", "retransmits", "gen", "conn", "client", "timeout", "rtx_stamp", "probe", "confirm")

    def __init__(self, stack: "Stack", local: bytes, lport: int, remote: bytes, rport: int,
                 conn: "Connection | None", client: bool, timeout: float, iss: int) -> None:
        self.stack = stack
        self.local, self.lport, self.remote, self.rport = local, lport, remote, rport
        self.state = _S.SYN_SENT if client else _S.SYN_RCVD
        self.snd_una = self.snd_nxt = iss
        self.rcv_nxt = 0
        self.out_seq = self.out_len = self.out_flags = 0
        self.out_first = self.out_sent = -1.0  # -1: nothing outstanding
        # Linux's retrans_stamp, what TCP_USER_TIMEOUT counts from: the SYN's first transmission (tcp_connect);
        # for data the first RTO retransmission (tcp_retransmit_skb; not the tail loss probe); -1: none yet
        self.rtx_stamp = -1.0
        self.probe = False  # the next timer is the tail loss probe's (tcp_schedule_loss_probe)
        self.retransmitted = False
        self.queue: list[int] = []  # payload lengths waiting to be sent
        self.rtt = Rto()
        self.retransmits = 0  # of the outstanding segment (icsk_retransmits)
        self.gen = 0  # retransmission timer generation: an older timer is stale
        self.confirm = False  # sk_dst_pending_confirm: the next segment confirms the next hop's neighbour
        self.conn = conn
        self.client = client
        self.timeout = timeout

    @property
    def alive(self) -> bool:
        return self.state in _LIVE

    @property
    def rto(self) -> float:
        """The current retransmission timeout, back-off included (``icsk_rto``)."""
        return self.rtt.current()

    @property
    def tag(self) -> int:
        return self.conn.tag if self.conn is not None else -1

    def _move(self, event: SockEvent) -> None:
        self.state = TRANSITIONS[self.state][event]

    # -------------------------------------------------------------- sending
    def _emit(self, seq: int, ack: int, flags: int, length: int) -> None:
        st = self.stack
        st.ident += 1
        seg = build.tcp(self.local, self.remote, self.lport, self.rport, seq, ack, flags, zeros(length), st.ident)
        if self.confirm:  # the first hop takes the socket's pending confirmation (``sock_confirm_neigh``)
            seg, self.confirm = linux.ConfirmingSegment(seg), False
        st.output(seg, self.tag, self.local)

    def _send_new(self, flags: int, length: int) -> None:
        """Put one segment in flight (stop-and-wait: only when nothing is outstanding)."""
        now = self.stack.clock.now
        self.out_seq, self.out_len, self.out_flags = self.snd_nxt, length, flags
        self.snd_nxt = (self.snd_nxt + length + (1 if flags & SYN else 0)) & _M32
        self.out_first = self.out_sent = now
        self.rtx_stamp = now if flags & SYN else -1.0
        self.retransmitted = False
        self.retransmits = 0
        self._emit(self.out_seq, self.rcv_nxt, flags, length)
        # data on an established connection: a tail loss probe first (RFC 8985 7; SACK is on between Linux
        # stacks), then the RTO from the probe on (tcp_send_loss_probe -> tcp_rearm_rto)
        self.probe = self.state == _S.ESTABLISHED and not flags & SYN and bool(self.rtt.srtt)
        self._arm(linux.loss_probe_timeout(self.rtt.srtt, self.rto) if self.probe else self.rto)

    def _arm(self, delay: float) -> None:
        """(Re)start the retransmission timer, never past the user timeout once it counts
        (``tcp_clamp_rto_to_user_timeout``, from retrans_stamp)."""
        self.gen += 1
        clock = self.stack.clock
        if self.rtx_stamp >= 0:
            delay = clamp_to_user_timeout(delay, self.rtx_stamp, self.timeout, clock.now)
        clock.timer(clock.now + delay, self._on_timer, self, self.gen)

    def _timed_out(self, now: float) -> bool:
        """``retransmits_timed_out``: the user timeout has run since retrans_stamp."""
        return self.rtx_stamp >= 0 and now >= self.rtx_stamp + self.timeout - 1e-9

    @staticmethod
    def _on_timer(sock: "TcpSock", gen: int) -> None:
        if gen != sock.gen or sock.out_first < 0 or not sock.alive:
            return
        # a paused VM's kernel timers run on (as the lab's namespaces, whose kernel is never paused):
        # what it retransmits meanwhile is lost
        sock._expire(sock.stack.clock.now)

    def _expire(self, now: float) -> None:
        """``tcp_retransmit_timer``: give up past the user timeout (``tcp_write_timeout``), else
        retransmit the oldest segment and back off."""
        if self.probe:  # ``tcp_send_loss_probe``: the last segment again, no back-off, no retransmission count
            self.probe = False
            self._retransmit(now)
            return
        if self._timed_out(now):
            self._die(_E.GIVE_UP)
            return
        self.retransmits += 1
        if self.rtx_stamp < 0:
            self.rtx_stamp = now
        self.rtt.back_off(self.state == _S.SYN_SENT, self.retransmits)
        self._retransmit(now)

    def _retransmit(self, now: float) -> None:
        self.retransmitted = True
        self.out_sent = now
        self._emit(self.out_seq, self.rcv_nxt, self.out_flags, self.out_len)
        self._arm(self.rto)

    def kick(self) -> None:
        """Resume after a pause: a retransmission whose timer ran out meanwhile goes now."""
        now = self.stack.clock.now
        if self.alive and self.out_first >= 0 and now - self.out_sent >= self.rto:
            if self._timed_out(now):
                self._die(_E.GIVE_UP)
            else:
                self._retransmit(now)

    def send(self, length: int) -> None:
        """Queue ``length`` bytes of application data."""
        if not self.alive:
            return
        if self.state == _S.ESTABLISHED and self.out_first < 0:
            self._send_new(ACK | PSH, length)
        else:
            self.queue.append(length)

    def connect(self) -> None:
        self._send_new(SYN, 0)

    def _die(self, event: SockEvent) -> None:
        accepted = self.client or self.state != _S.SYN_RCVD  # a request socket's end no application sees
        if accepted and event == _E.GIVE_UP and self.local not in self.stack.addresses:
            # the application finds its own address gone when its connection ends (the lab's endpoint
            # binds to it to see: ``address_gone``)
            _observe(self.conn, self.stack.clock.now, self.client, Seen.UNREACHABLE)
        self._move(event)
        self.gen += 1
        self.out_first = -1.0
        self.stack.forget(self)
        if self.conn is not None and accepted:
            self.conn.on_broken(self.stack.clock.now, self.state, self.client)

    # -------------------------------------------------------------- errors (net/ipv4/tcp_ipv4.c)
    def icmp_error(self, icmp_type: int, code: int, seq: int, now: float) -> None:
        """``tcp_v4_err``: an ICMP error quoting our segment with sequence number ``seq``."""
        err = linux.icmp_error(icmp_type, code)
        if err is None:
            return
        if self.state == _S.SYN_RCVD:  # a request socket (``tcp_req_err``): a fatal error drops it, silently
            if err.fatal and seq == self.out_seq:
                self._die(_E.ERROR)
            return
        if not _between(seq, self.snd_una, self.snd_nxt):
            return  # out of window: not ours
        if linux.reverts_backoff(icmp_type, code):
            self._revert(seq, now)
        if self.state == _S.SYN_SENT:  # the connect fails with the error, whatever it is
            self.error(err.errno, now)
            return
        self._report(err.errno, now)  # RFC 1122 4.2.3.9: the connection goes on

    def _revert(self, seq: int, now: float) -> None:
        """``tcp_ld_RTO_revert`` (RFC 6069): an unreachable for the oldest outstanding segment, while
        backed off, undoes one back-off step; the retransmission goes at once if that timeout has
        already run since it was last sent."""
        if seq != self.snd_una or self.out_first < 0 or not self.retransmits or not self.rtt.revert():
            return
        remaining = self.rto - (now - self.out_sent)
        if remaining > 0:
            self._arm(remaining)
        else:
            self._expire(now)

    def _report(self, err: int, now: float) -> None:
        """An error read by the application (IP_RECVERR): a passing report it goes on after, or its end."""
        if err in linux.SOFT_ERRNOS:
            if err in linux.UNREACHABLE_ERRNOS:
                _observe(self.conn, now, self.client, Seen.UNREACHABLE)
            return
        self.error(err, now)

    def error(self, err: int, now: float) -> None:
        """The connection ends on error ``err`` (connect failed; or the application closed on it)."""
        if not self.alive:
            return
        if err in linux.UNREACHABLE_ERRNOS:
            _observe(self.conn, now, self.client, Seen.UNREACHABLE)
        self._die(_E.RST_OK if err == _errno.ECONNREFUSED else _E.ERROR)

    # -------------------------------------------------------------- receiving
    def segment(self, pkt, now: float) -> None:
        flags = pkt.tcp_flags
        if flags & RST:
            ok = (pkt.ack == self.snd_nxt) if self.state == _S.SYN_SENT else (pkt.seq == self.rcv_nxt)
            if ok:
                self._die(_E.RST_OK)
            return
        state = self.state
        if state == _S.SYN_SENT:
            if flags & SYN and flags & ACK and pkt.ack == self.snd_nxt:
                self.rcv_nxt = (pkt.seq + 1) & _M32
                self._acked(pkt.ack, now)
                self._move(_E.SYNACK_OK)
                self._emit(self.snd_nxt, self.rcv_nxt, ACK, 0)
                if self.conn is not None:
                    self.conn.on_established(now, self)
                self._next()
            return
        if flags & SYN:  # a retransmitted SYN or SYN-ACK: our answer was lost
            if state == _S.SYN_RCVD and not flags & ACK:
                self._emit(self.out_seq, self.rcv_nxt, SYN | ACK, 0)
            elif flags & ACK:
                self._emit(self.snd_nxt, self.rcv_nxt, ACK, 0)
            return
        if not flags & ACK:
            return
        if state == _S.SYN_RCVD:
            if pkt.ack != self.snd_nxt:
                return
            self._acked(pkt.ack, now)
            self._move(_E.ACK_OK)
            if self.conn is not None:
                self.conn.on_established(now, self)
        elif _after(pkt.ack, self.snd_una) and not _after(pkt.ack, self.snd_nxt):
            self._acked(pkt.ack, now)
        n = pkt.payload_len
        if n:
            if pkt.seq == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + n) & _M32
                if self.conn is not None:
                    self.conn.on_data(now, self, n)
                elif not self.client:
                    self.send(n)  # a server without a scenario connection echoes
                if self.out_first < 0 and not self.queue:
                    self._emit(self.snd_nxt, self.rcv_nxt, ACK, 0)
            else:  # a duplicate: acknowledge again
                self._emit(self.snd_nxt, self.rcv_nxt, ACK, 0)
        self._next()

    def _acked(self, ack: int, now: float) -> None:
        self.snd_una = ack
        self.confirm = True  # forward progress: ``tcp_ack`` -> ``sk_dst_confirm``
        if self.out_first >= 0 and ack == self.snd_nxt:
            # TCP timestamps (RFC 7323, on in Linux by default): the echoed timestamp is the last
            # transmission's, so a retransmitted segment gives a sample too (Karn's rule is for stacks without)
            self.rtt.sample(now - self.out_sent)
            self.rtt.acked()
            self.retransmits = 0
            self.out_first = self.rtx_stamp = -1.0
            self.probe = False
            self.gen += 1

    def _next(self) -> None:
        if self.out_first < 0 and self.queue and self.state == _S.ESTABLISHED:
            self._send_new(ACK | PSH, self.queue.pop(0))


class UdpSock:
    """A UDP socket.  A server answers every request it accepts; a client talks to one server.

    A client's datagrams start with ``H`` (hello) until its first answer, then ``D``.  A
    *session* server (an application that keys its state on the client's address and
    port) accepts a source it does not know only with a hello.
    """

    __slots__ = ("stack", "local", "lport", "remote", "rport", "conn", "client", "session", "known", "sent",
                 "errors")

    def __init__(self, stack: "Stack", local: bytes | None, lport: int, remote: bytes | None, rport: int,
                 conn: "Connection | None", client: bool, session: bool = False) -> None:
        self.stack = stack
        self.local, self.lport, self.remote, self.rport = local, lport, remote, rport
        self.conn = conn
        self.client = client
        self.session = session
        self.known: set[tuple[bytes, int]] = set()
        self.sent = 0  # client: 1 once answered
        self.errors: list[int] = []  # errors the application read (a connected client with IP_RECVERR)

    def send(self, length: int, dst: bytes | None = None, dport: int = 0, tag: int = -1,
             src: bytes | None = None) -> None:
        st = self.stack
        st.ident += 1
        if self.client:
            tag = self.conn.tag if self.conn is not None else -1
            mark = b"D" if self.sent else b"H"  # hello until the first answer (a lost hello is re-sent)
            payload = mark + zeros(max(0, length - 1))
        else:
            payload = zeros(length)
        local, to = src or self.local, dst or self.remote
        assert local is not None and to is not None, "a datagram needs both ends (a server answers its sender)"
        st.output(build.udp(local, to, self.lport, dport or self.rport, payload, st.ident), tag,
                  local)

    def icmp_error(self, icmp_type: int, code: int, now: float) -> None:
        """``__udp4_lib_err``: a connected client with IP_RECVERR (as the lab's endpoints set it) reads every
        error on its next call; the application goes on (ECONNREFUSED too: a passing report, as the lab's
        endpoint program logs it), an unreachable one is its observation.  A server socket (unconnected,
        no IP_RECVERR) is told nothing."""
        err = linux.icmp_error(icmp_type, code)
        if err is None or not self.client:
            return
        self.errors.append(err.errno)
        if err.errno in linux.UNREACHABLE_ERRNOS:
            _observe(self.conn, now, True, Seen.UNREACHABLE)

    def datagram(self, pkt, data: bytes, tag: int, now: float) -> None:
        if self.client:
            if pkt.src != self.remote or pkt.sport != self.rport:
                # a connected socket matches only its peer (``udp4_lib_lookup``): for Linux no socket took it
                self.stack.lose(tag, Loss.NO_SOCKET)
                self.stack.port_unreachable(data, pkt, tag)
                return
            self.sent = 1
            if self.conn is not None:
                self.conn.on_data(now, self, pkt.payload_len)
            return
        if self.session:
            source = (pkt.src, pkt.sport)
            if source not in self.known:
                hello = pkt.payload_len > 0 and data[pkt.l4 + 8] == 0x48  # "H"
                if not hello:  # mid-session datagram from a source the application never met
                    self.stack.lose(tag, Loss.NO_SOCKET)
                    return
                self.known.add(source)
        conn = self.stack.conn_of(tag)
        self.send(conn.spec.response if conn is not None else pkt.payload_len, pkt.src, pkt.sport, tag, pkt.dst)


class Stack:
    """One machine's sockets.  ``output(bytes, tag, src)`` is where its packets go."""

    __slots__ = ("name", "clock", "addresses", "out", "tcp", "udp", "listeners", "ident", "lose_fn",
                 "observe", "paused", "conn_of", "icmp_limit", "paused_at", "deferred")

    def __init__(self, name: str, clock: Clock, lose: Callable[[int, Loss], None]) -> None:
        self.name = name
        self.clock = clock
        self.addresses: set[bytes] = set()
        self.out: Callable[[bytes, int], None] | None = None
        self.tcp: dict[tuple, TcpSock] = {}
        self.udp: dict[int, UdpSock] = {}
        self.listeners: dict[int, float] = {}  # listening TCP port -> its sockets' timeout
        self.ident = 0
        self.lose_fn = lose
        #: bookkeeping only: which scenario connection a packet's tag names (for the report)
        self.conn_of: Callable[[int], "Connection | None"] = lambda tag: None
        self.observe = False  # a remote peer notes the source its connections arrive from
        self.paused = False
        self.paused_at = 0.0
        #: the applications' timers that came due while paused: a frozen process runs them when it runs again
        self.deferred: list[tuple] = []
        self.icmp_limit = linux.IcmpLimiter()  # Linux's default ICMP rate limit (per destination)

    def lose(self, tag: int, why: Loss) -> None:
        self.lose_fn(tag, why)

    def output(self, data: bytes, tag: int, src: bytes) -> None:
        if self.paused:
            self.lose(tag, Loss.VM_DOWN)
        elif src not in self.addresses:
            self.lose(tag, Loss.ADDRESS_GONE)
        elif self.out is None:
            self.lose(tag, Loss.NO_ROUTE)
            self.unreachable(data, tag, linux.ICMP_NET_UNREACH)
        else:
            self.out(data, tag)

    def unreachable(self, data: bytes, tag: int, code: int, delay: float = 0.0) -> None:
        """A packet of ours that cannot leave: no route (the syscall fails with ENETUNREACH), or our own
        neighbour resolution failed (``ipv4_link_failure`` sends ourselves ICMP host unreachable).  Either
        reaches the socket as ``tcp_v4_err``/``__udp4_lib_err`` would have it, ``delay`` seconds later."""
        from .world import icmp_unreachable  # noqa: PLC0415 - world builds every ICMP error
        try:
            src = parse_ip(data).src
        except ParseError:
            return
        msg = icmp_unreachable(src, data, code)
        if msg is not None:
            self.clock.after(delay, lambda st, m: st.receive(m, -1), self, msg)

    def port_unreachable(self, data: bytes, pkt, tag: int) -> None:
        """``__udp4_lib_rcv`` with no socket: ICMP port unreachable to the sender, rate-limited."""
        from .world import icmp_unreachable  # noqa: PLC0415
        if not self.icmp_limit.allow(pkt.src, self.clock.now):
            return
        msg = icmp_unreachable(pkt.dst, data, linux.ICMP_PORT_UNREACH)
        if msg is not None:
            self.output(msg, -1, pkt.dst)  # its own packet: its fate is no connection's loss

    def _icmp(self, pkt, now: float) -> None:
        """An ICMP error for one of our sockets (matched on the packet it quotes)."""
        inner = pkt.inner
        if inner is None or inner.src not in self.addresses:
            return
        if inner.proto == Proto.TCP:
            s = self.tcp.get((inner.src, inner.sport, inner.dst, inner.dport))
            if s is not None:
                s.icmp_error(pkt.icmp_type, pkt.icmp_code, inner.seq, now)
        elif inner.proto == Proto.UDP:
            u = self.udp.get(inner.sport)
            if u is not None and u.client and u.remote == inner.dst and u.rport == inner.dport:
                u.icmp_error(pkt.icmp_type, pkt.icmp_code, now)

    def forget(self, sock: TcpSock) -> None:
        self.tcp.pop((sock.local, sock.lport, sock.remote, sock.rport), None)

    # -------------------------------------------------------------- opening
    def tcp_connect(self, local: bytes, lport: int, remote: bytes, rport: int, conn: "Connection", timeout: float,
                    iss: int) -> TcpSock:
        s = TcpSock(self, local, lport, remote, rport, conn, True, timeout, iss)
        self.tcp[(local, lport, remote, rport)] = s
        s.connect()
        return s

    def tcp_listen(self, port: int, timeout: float) -> None:
        self.listeners[port] = timeout

    def udp_open(self, local: bytes | None, lport: int, remote: bytes | None, rport: int, conn: "Connection | None",
                 client: bool, session: bool = False) -> UdpSock:
        s = UdpSock(self, local, lport, remote, rport, conn, client, session)
        self.udp[lport] = s
        return s

    def pause(self, now: float) -> None:
        self.paused, self.paused_at = True, now

    def holds(self, now: float) -> bool:
        """Is an application timer due at ``now`` held?  Paused, and after the pause's instant (what is due at
        the move itself ran before it: the lab freezes the VM's processes just after the move's time)."""
        return self.paused and now > self.paused_at + 1e-6

    def defer(self, fn, a=None, b=None) -> None:
        self.deferred.append((fn, a, b))

    def resume(self) -> None:
        self.paused = False
        for s in list(self.tcp.values()):
            s.kick()
        held, self.deferred = self.deferred, []
        for fn, a, b in held:
            fn(a, b)

    # -------------------------------------------------------------- input
    def receive(self, data: bytes, tag: int) -> None:
        if self.paused:
            self.lose(tag, Loss.VM_DOWN)
            return
        try:
            pkt = parse_ip(data)
        except ParseError:
            self.lose(tag, Loss.PARSE)
            return
        if pkt.dst not in self.addresses:
            self.lose(tag, Loss.NO_HOLDER)
            return
        now = self.clock.now
        if pkt.proto == Proto.TCP:
            key = (pkt.dst, pkt.dport, pkt.src, pkt.sport)
            s = self.tcp.get(key)
            if s is not None:
                if self.observe and s.conn is not None:
                    s.conn.on_peer_saw(now, pkt.src, pkt.sport)
                s.segment(pkt, now)
                return
            flags = pkt.tcp_flags
            if flags & SYN and not flags & ACK and pkt.dport in self.listeners:
                conn = self.conn_of(tag)
                s = TcpSock(self, pkt.dst, pkt.dport, pkt.src, pkt.sport, conn, False, self.listeners[pkt.dport],
                            (0x10000000 + 7919 * len(self.tcp) + pkt.sport) & _M32)
                s.rcv_nxt = (pkt.seq + 1) & _M32
                self.tcp[key] = s
                if self.observe and conn is not None:
                    conn.on_peer_saw(now, pkt.src, pkt.sport)
                s._send_new(SYN | ACK, 0)
                return
            if self.observe:  # the peer saw it, even if it knows no connection for it
                conn = self.conn_of(tag)
                if conn is not None:
                    conn.on_peer_saw(now, pkt.src, pkt.sport)
            if not flags & RST:  # RFC 793: a segment for no connection gets a RST
                self.ident += 1
                if flags & ACK:
                    rst = build.tcp(pkt.dst, pkt.src, pkt.dport, pkt.sport, pkt.ack, 0, RST, b"", self.ident)
                else:
                    seg_len = pkt.payload_len + (1 if flags & SYN else 0)
                    rst = build.tcp(pkt.dst, pkt.src, pkt.dport, pkt.sport, 0, pkt.seq + seg_len, RST | ACK, b"",
                                    self.ident)
                self.output(rst, tag, pkt.dst)
            return
        if pkt.proto == Proto.UDP:
            us = self.udp.get(pkt.dport)
            if us is None:
                self.lose(tag, Loss.NO_SOCKET)
                self.port_unreachable(data, pkt, tag)
                return
            if self.observe:
                conn = self.conn_of(tag)
                if conn is not None:
                    conn.on_peer_saw(now, pkt.src, pkt.sport)
            us.datagram(pkt, data, tag, now)
            return
        if pkt.proto == Proto.ICMP and pkt.inner is not None:
            self._icmp(pkt, now)
            return
        self.lose(tag, Loss.NO_SOCKET)
