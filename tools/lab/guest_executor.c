/* roam-ep serve: the guest's thin socket executor (see guest_endpoint.c for the commands).
 *
 * The one client schedule runs on the host (tools/lab/guest_vm.py); this only opens, sends,
 * receives and reports, one JSON line per observation in tools/lab/endpoint.py's vocabulary.
 * Its servers answer tools/lab/endpoint.py's requests as that module's servers do.
 */
#include "guest_common.h"

enum kind { K_FREE, K_TCP_CLIENT, K_UDP_CLIENT, K_TCP_LISTEN, K_UDP_SERVER, K_TCP_SERVED };
#define SLOTS 512
#define KNOWN 64
struct slot {
    enum kind kind;
    int fd, idx, up, timeout, session, answered;
    char local[32], peer[32];
    int peer_port;
    /* a served TCP connection: the request being read (7-byte header, then LEN-7 bytes to skip) */
    unsigned char hdr[7];
    int hdrlen, skip, resp, cur;
    /* a UDP server: the last source per connection index, the sources of open sessions */
    struct sockaddr_in known[KNOWN];
    int nknown;
};
static struct slot slots[SLOTS];

static int addr_gone(const char *addr) {
    if (!addr[0] || strcmp(addr, "0.0.0.0") == 0) return 0;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) return 0;
    int s = socket(AF_INET, SOCK_DGRAM, 0), gone = 0;
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0) gone = errno == EADDRNOTAVAIL;
    close(s);
    return gone;
}

static int is_reset(int e) { return e == ECONNRESET || e == ECONNREFUSED; }

static struct slot *new_slot(enum kind k, int fd, int idx) {
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].kind == K_FREE) {
            memset(&slots[i], 0, sizeof slots[i]);
            slots[i].kind = k, slots[i].fd = fd, slots[i].idx = idx;
            return &slots[i];
        }
    close(fd);
    emit("\"ev\": \"bad_command\", \"op\": \"too many sockets\"");
    return NULL;
}

static struct slot *client_slot(int idx) {
    for (int i = 0; i < SLOTS; i++)
        if ((slots[i].kind == K_TCP_CLIENT || slots[i].kind == K_UDP_CLIENT) && slots[i].idx == idx) return &slots[i];
    return NULL;
}

static void free_slot(struct slot *s) {
    close(s->fd);
    s->kind = K_FREE;
}

static void local_of(int fd, char *out) {
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    out[0] = 0;
    if (getsockname(fd, (struct sockaddr *)&l, &ll) == 0) inet_ntop(AF_INET, &l.sin_addr, out, 32);
}

static void client_broken(struct slot *s, const char *err, const char *why) {
    int reset = strcmp(err, "ECONNRESET") == 0 || strcmp(err, "ECONNREFUSED") == 0;
    emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\", \"why\": \"%s\", "
         "\"address_gone\": %s", s->idx, err, why, !reset && addr_gone(s->local) ? "true" : "false");
    free_slot(s);
}

/* A served connection's index as JSON: null until its first request named it. */
static const char *idx_json(const struct slot *s) {
    static char b[16];
    if (s->idx < 0) return "null";
    snprintf(b, sizeof b, "%d", s->idx);
    return b;
}

static void served_broken(struct slot *s, int err) {
    const char *name = err < 0 ? "EPROTO" : errname(err);
    emit("\"ev\": \"broken\", \"idx\": %s, \"side\": \"server\", \"err\": \"%s\", \"address_gone\": %s, "
         "\"peer\": [\"%s\", %d]", idx_json(s), name,
         err >= 0 && !is_reset(err) && addr_gone(s->local) ? "true" : "false", s->peer, s->peer_port);
    free_slot(s);
}

static void cmd_listen(char kind, int port, int arg) {
    int fd = socket(AF_INET, kind == 'T' ? SOCK_STREAM : SOCK_DGRAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || (kind == 'T' && listen(fd, 64) < 0)) {
        emit("\"ev\": \"bad_command\", \"op\": \"listen\", \"err\": \"%s\"", errname(errno));
        close(fd);
        return;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct slot *s = new_slot(kind == 'T' ? K_TCP_LISTEN : K_UDP_SERVER, fd, -1);
    if (!s) return;
    if (kind == 'T') s->timeout = arg; else s->session = arg;
    emit("\"ev\": \"listening\", \"port\": %d", port);
}

static void cmd_connect(char kind, int idx, const char *dst, int port, int sport, int timeout) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(sport)};
    if (inet_pton(AF_INET, dst, &sa.sin_addr) != 1) {
        emit("\"ev\": \"bad_command\", \"op\": \"connect\"");
        return;
    }
    int fd = socket(AF_INET, kind == 'T' ? SOCK_STREAM : SOCK_DGRAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (kind == 'T') tune(fd, timeout);
    else {
        setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof one);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
    struct slot *s = new_slot(kind == 'T' ? K_TCP_CLIENT : K_UDP_CLIENT, fd, idx);
    if (!s) return;
    int err = 0;
    if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0 || (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0
                                                           && errno != EINPROGRESS))
        err = errno;
    if (kind == 'T') {
        if (err) client_broken(s, errname(err), "");
        return;
    }
    s->up = 1;
    local_of(fd, s->local);
    if (err) emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", idx, errname(err));
}

static void cmd_send(int idx, int len, int resp, char mark) {
    struct slot *s = client_slot(idx);
    if (!s || (s->kind == K_TCP_CLIENT && !s->up)) return;
    static unsigned char buf[65536];
    if (len > (int)sizeof buf) len = sizeof buf;
    memset(buf, 0, len);
    buf[0] = mark;
    buf[1] = idx >> 8, buf[2] = idx & 255;
    if (s->kind == K_TCP_CLIENT) buf[3] = len >> 8, buf[4] = len & 255, buf[5] = resp >> 8, buf[6] = resp & 255;
    else buf[3] = resp >> 8, buf[4] = resp & 255;
    ssize_t w = send(s->fd, buf, len, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) {
        if (s->kind == K_TCP_CLIENT) client_broken(s, errname(errno), "send");
        else emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", idx, errname(errno));
    }
}

static void cmd_address(const char *cidr, const char *gw) {
    char sh[256];
    snprintf(sh, sizeof sh, "ip addr flush dev eth0%s%s%s%s%s", strcmp(cidr, "-") ? "; ip addr add " : "",
             strcmp(cidr, "-") ? cidr : "", strcmp(cidr, "-") ? " dev eth0" : "",
             strcmp(gw, "-") && strcmp(cidr, "-") ? "; ip route replace default via " : "",
             strcmp(gw, "-") && strcmp(cidr, "-") ? gw : "");
    int rc = system(sh);
    emit("\"ev\": \"addressed\", \"rc\": %d", rc);
}

static int command(char *line) {
    char a[64] = "", b[64] = "", c[64] = "", d[64] = "";
    int n1 = 0, n2 = 0, n3 = 0, n4 = 0;
    switch (line[0]) {
    case 'Q': return 1;
    case 'L':
        if (sscanf(line, "L %1s %d %d", a, &n1, &n2) == 3) cmd_listen(a[0], n1, n2);
        break;
    case 'C':
        if (sscanf(line, "C %1s %d %63s %d %d %d", a, &n1, b, &n2, &n3, &n4) >= 5) cmd_connect(a[0], n1, b, n2, n3, n4);
        break;
    case 'S':
        if (sscanf(line, "S %d %d %d %1s", &n1, &n2, &n3, a) == 4) cmd_send(n1, n2, n3, a[0]);
        break;
    case 'B':
        if (sscanf(line, "B %d %63s %63s", &n1, c, d) >= 2) {
            struct slot *s = client_slot(n1);
            if (s) client_broken(s, c, d);
        }
        break;
    case 'A':
        if (sscanf(line, "A %63s %63s", a, b) == 2) cmd_address(a, b);
        break;
    default:
        emit("\"ev\": \"bad_command\", \"op\": \"%.1s\"", line);
    }
    return 0;
}

static void on_tcp_client(struct slot *s) {
    if (!s->up) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            client_broken(s, errname(err), "");
            return;
        }
        struct sockaddr_in l, r;
        socklen_t ll = sizeof l, rl = sizeof r;
        if (getpeername(s->fd, (struct sockaddr *)&r, &rl) < 0) return; /* not yet */
        getsockname(s->fd, (struct sockaddr *)&l, &ll);
        char rs[32];
        inet_ntop(AF_INET, &l.sin_addr, s->local, sizeof s->local);
        inet_ntop(AF_INET, &r.sin_addr, rs, sizeof rs);
        s->up = 1;
        emit("\"ev\": \"established\", \"idx\": %d, \"side\": \"client\", \"local\": [\"%s\", %d], "
             "\"remote\": [\"%s\", %d]", s->idx, s->local, ntohs(l.sin_port), rs, ntohs(r.sin_port));
        return;
    }
    char buf[65536];
    ssize_t r = recv(s->fd, buf, sizeof buf, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        if (soft(errno) && !dead(s->fd)) {
            emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", s->idx, errname(errno));
            drain_errqueue(s->fd);
            return;
        }
        client_broken(s, errname(errno), "");
        return;
    }
    if (r == 0) {
        client_broken(s, "EOF", "");
        return;
    }
    emit("\"ev\": \"rx\", \"idx\": %d, \"n\": %ld", s->idx, (long)r);
}

static void on_udp_client(struct slot *s) {
    char buf[65536];
    ssize_t r = recv(s->fd, buf, sizeof buf, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) {
            drain_errqueue(s->fd);
            return;
        }
        emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", s->idx, errname(errno));
        drain_errqueue(s->fd);
        return;
    }
    if (!s->answered++) { /* UDP is "established" by its first answer */
        struct sockaddr_in l, p;
        socklen_t ll = sizeof l, pl = sizeof p;
        char ps[32];
        getsockname(s->fd, (struct sockaddr *)&l, &ll);
        getpeername(s->fd, (struct sockaddr *)&p, &pl);
        inet_ntop(AF_INET, &l.sin_addr, s->local, sizeof s->local);
        inet_ntop(AF_INET, &p.sin_addr, ps, sizeof ps);
        emit("\"ev\": \"established\", \"idx\": %d, \"side\": \"client\", \"local\": [\"%s\", %d], "
             "\"remote\": [\"%s\", %d]", s->idx, s->local, ntohs(l.sin_port), ps, ntohs(p.sin_port));
    }
    emit("\"ev\": \"rx\", \"idx\": %d, \"n\": %ld", s->idx, (long)r);
}

static void on_listen(struct slot *s) {
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    int c = accept(s->fd, (struct sockaddr *)&from, &fl);
    if (c < 0) return;
    tune(c, s->timeout);
    struct slot *n = new_slot(K_TCP_SERVED, c, -1);
    if (!n) return;
    inet_ntop(AF_INET, &from.sin_addr, n->peer, sizeof n->peer);
    n->peer_port = ntohs(from.sin_port);
    local_of(c, n->local);
}

static void on_served(struct slot *s) {
    unsigned char buf[65536];
    ssize_t r = recv(s->fd, buf, sizeof buf, 0);
    if (r < 0) {
        int e = errno;
        if (e == EAGAIN || e == EINTR) return;
        if (soft(e) && !dead(s->fd)) {
            emit("\"ev\": \"error\", \"idx\": %s, \"side\": \"server\", \"err\": \"%s\"", idx_json(s), errname(e));
            drain_errqueue(s->fd);
            return;
        }
        served_broken(s, e);
        return;
    }
    if (r == 0) {
        served_broken(s, 0);
        return;
    }
    for (ssize_t i = 0; i < r;) {
        if (s->skip > 0) {
            ssize_t k = r - i < s->skip ? r - i : s->skip;
            s->skip -= k, i += k;
        } else {
            s->hdr[s->hdrlen++] = buf[i++];
            if (s->hdrlen < 7) continue;
            s->hdrlen = 0;
            int req = s->hdr[3] << 8 | s->hdr[4];
            s->cur = s->hdr[1] << 8 | s->hdr[2];
            s->resp = s->hdr[5] << 8 | s->hdr[6];
            if (s->hdr[0] != 'R' || req < 7) {
                served_broken(s, -1);
                return;
            }
            s->skip = req - 7;
        }
        if (s->skip == 0 && s->hdrlen == 0) { /* a whole request: answer it */
            if (s->idx < 0) { /* the first request names the connection */
                s->idx = s->cur;
                emit("\"ev\": \"saw\", \"idx\": %d, \"side\": \"server\", \"address\": \"%s\", \"port\": %d",
                     s->idx, s->peer, s->peer_port);
            }
            static unsigned char zero[65536];
            int n = s->resp > 0 ? s->resp : 1;
            int fl = fcntl(s->fd, F_GETFL);
            fcntl(s->fd, F_SETFL, fl & ~O_NONBLOCK);
            ssize_t w = send(s->fd, zero, n, MSG_NOSIGNAL);
            fcntl(s->fd, F_SETFL, fl);
            if (w < 0) {
                served_broken(s, errno);
                return;
            }
        }
    }
}

static int known(struct slot *s, const struct sockaddr_in *a) {
    for (int i = 0; i < s->nknown; i++)
        if (s->known[i].sin_addr.s_addr == a->sin_addr.s_addr && s->known[i].sin_port == a->sin_port) return 1;
    return 0;
}

/* The last source seen per connection index (a UDP server announces a new one with "saw"). */
#define LASTS 4096
static struct sockaddr_in last_src[LASTS];

static void on_udp_server(struct slot *s) {
    for (int k = 0; k < 64; k++) {
        unsigned char buf[65536];
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t r = recvfrom(s->fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            continue; /* an ICMP error for an earlier answer: nothing to do for a server */
        }
        if (r < 5) continue;
        int idx = buf[1] << 8 | buf[2], resp = buf[3] << 8 | buf[4];
        char a[32];
        inet_ntop(AF_INET, &from.sin_addr, a, sizeof a);
        struct sockaddr_in *last = idx < LASTS ? &last_src[idx] : NULL;
        if (!last || last->sin_addr.s_addr != from.sin_addr.s_addr || last->sin_port != from.sin_port) {
            if (last) *last = from;
            emit("\"ev\": \"saw\", \"idx\": %d, \"side\": \"server\", \"address\": \"%s\", \"port\": %d",
                 idx, a, ntohs(from.sin_port));
        }
        if (s->session && !known(s, &from)) {
            if (buf[0] != 'H') { /* mid-session datagram from a source the application never met */
                emit("\"ev\": \"ignored\", \"idx\": %d, \"side\": \"server\", \"address\": \"%s\", \"port\": %d",
                     idx, a, ntohs(from.sin_port));
                continue;
            }
            if (s->nknown < KNOWN) s->known[s->nknown++] = from;
        }
        static unsigned char zero[65536];
        sendto(s->fd, zero, resp > 0 ? resp : 1, 0, (struct sockaddr *)&from, sizeof from);
    }
}

int serve(void) {
    char in[8192];
    int have = 0;
    double stdin_back = 0;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    emit("\"ev\": \"ready\"");
    for (;;) {
        struct pollfd p[SLOTS + 1];
        int map[SLOTS + 1], n = 0;
        if (now() >= stdin_back) p[n] = (struct pollfd){0, POLLIN, 0}, map[n++] = -1;
        for (int i = 0; i < SLOTS; i++)
            if (slots[i].kind != K_FREE) {
                short ev = slots[i].kind == K_TCP_CLIENT && !slots[i].up ? POLLOUT : POLLIN;
                p[n] = (struct pollfd){slots[i].fd, ev, 0}, map[n++] = i;
            }
        if (poll(p, n, 200) <= 0) continue;
        for (int j = 0; j < n; j++) {
            if (!p[j].revents) continue;
            if (map[j] < 0) {
                ssize_t r = read(0, in + have, sizeof in - 1 - have);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    stdin_back = now() + 0.2; /* the host end is away (e.g. reconnecting): look again soon */
                    continue;
                }
                if (r < 0) continue;
                have += r;
                char *nl;
                while ((nl = memchr(in, '\n', have))) {
                    *nl = 0;
                    if (command(in)) return 0;
                    have -= nl + 1 - in;
                    memmove(in, nl + 1, have);
                }
                if (have >= (int)sizeof in - 1) have = 0; /* a line too long: dropped */
                continue;
            }
            struct slot *s = &slots[map[j]];
            if (s->kind == K_FREE) continue; /* closed by an earlier command in this round */
            switch (s->kind) {
            case K_TCP_CLIENT: on_tcp_client(s); break;
            case K_UDP_CLIENT: on_udp_client(s); break;
            case K_TCP_LISTEN: on_listen(s); break;
            case K_UDP_SERVER: on_udp_server(s); break;
            case K_TCP_SERVED: on_served(s); break;
            default: break;
            }
        }
    }
}
