/* What the guest's two endpoint programs share (tools/lab/guest_endpoint.c, guest_executor.c):
 * one JSON line per observation, written with one write(), and the socket options and error
 * names of tools/lab/endpoint.py.  Every function is static inline: each program takes what it uses. */
#ifndef ROAM_GUEST_COMMON_H
#define ROAM_GUEST_COMMON_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef TCP_USER_TIMEOUT
#define TCP_USER_TIMEOUT 18
#endif
#define TCP_CLOSE_STATE 7

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One JSON line, written with one write(): lines of several writers never interleave. */
static inline void emit(const char *fmt, ...) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "{\"t\": %.6f, ", now());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n - 2, fmt, ap);
    va_end(ap);
    buf[n++] = '}';
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        off += w;
    }
}

static inline const char *errname(int e) {
    switch (e) {
    case ECONNRESET: return "ECONNRESET";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTDOWN: return "EHOSTDOWN";
    case ENETDOWN: return "ENETDOWN";
    case EPIPE: return "EPIPE";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EINVAL: return "EINVAL";
    case 0: return "EOF";
    default: return "EOTHER";
    }
}

static inline int soft(int e) { return e == EHOSTUNREACH || e == ENETUNREACH || e == EHOSTDOWN || e == ENETDOWN; }

/* Has the kernel ended this connection?  (An error then is its death, not an ICMP report.) */
static inline int dead(int fd) {
    unsigned char info[8];
    socklen_t len = sizeof info;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0) return 1;
    return info[0] == TCP_CLOSE_STATE;
}

static inline void drain_errqueue(int fd) {
    char b[512], c[512];
    for (int i = 0; i < 64; i++) {
        struct iovec iov = {b, sizeof b};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = c;
        m.msg_controllen = sizeof c;
        if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) break;
    }
}

static inline void tune(int fd, int timeout_ms) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout_ms, sizeof timeout_ms);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

#endif
