/* The endpoint program of a real guest (tools/lab/guest.py builds it with gcc -static).
 *
 *   roam-ep serve                       a thin socket executor driven over the control port
 *   roam-ep client IDX DST PORT INTERVAL_MS TIMEOUT_MS DURATION_MS
 *   roam-ep server IDX PORT TIMEOUT_MS
 *
 * serve (what `roam replay --backend qemu` runs): the guest has no Python, and there is ONE
 * client schedule (sim/schedule.py), so the schedule runs on the host (tools/lab/qemu_play.py)
 * and this program only does what it is told, on stdin, one command a line:
 *
 *   L T PORT TIMEOUT_MS            TCP server: answer each request (tools/lab/endpoint.py's
 *   L U PORT SESSION               _REQ/_DGRAM headers) with RESP bytes; UDP: SESSION=1 ignores
 *                                  a mid-session datagram from a source it never met
 *   C T IDX DST PORT SPORT TIMEOUT_MS   TCP client: connect (TCP_USER_TIMEOUT, IP_RECVERR)
 *   C U IDX DST PORT SPORT         UDP client: a connected socket
 *   S IDX LEN RESP MARK            send one request (MARK R: TCP; H first / D later: UDP)
 *   B IDX ERR WHY                  the host gave up on client IDX: close it, report broken
 *   A CIDR|- GW|-                  re-address eth0 (a DHCP lease), then report "addressed"
 *   Q                              exit
 *
 * and reports what its sockets see as JSON lines in tools/lab/endpoint.py's vocabulary
 * (established, rx, error, broken with address_gone, saw, ignored).  The host stamps each
 * line with its own clock on arrival: the guest's clock stops while it is paused.
 *
 * client/server (tests/vm/test_qemu_migration.py): a numbered line every INTERVAL_MS for
 * DURATION_MS to an echo server, every byte checked in order; the server echoes.
 * It never judges.
 */
#include "guest_common.h"

#define LINE 32          /* bytes per request line, newline included */
#define MAXCONN 16

int serve(void); /* guest_executor.c */

static void line_for(char *out, int idx, long seq) {
    /* "IDX SEQ" padded with a pattern that depends on seq, then '\n': a lost or
     * shifted byte anywhere changes what comes back */
    int n = snprintf(out, LINE, "%d %ld ", idx, seq);
    for (int i = n; i < LINE - 1; i++) out[i] = 'a' + (int)((seq + i) % 26);
    out[LINE - 1] = '\n';
}

static int client(int idx, const char *dst, int port, int interval, int timeout, int duration) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, dst, &sa.sin_addr) != 1) {
        emit("\"ev\": \"bad_command\", \"op\": \"client\"");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    tune(fd, timeout);
    emit("\"ev\": \"start\", \"idx\": %d, \"side\": \"client\"", idx);
    double t0 = now(), next = t0, stop = t0 + duration / 1e3, linger = timeout / 1e3;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\", \"why\": \"connect\"",
             idx, errname(errno));
        return 1;
    }
    int up = 0;
    long sent = 0, answered = 0, echoed = 0, mismatches = 0;
    char got[LINE], want[LINE], buf[4096];
    int have = 0;
    for (;;) {
        double t = now();
        if (!up && t > t0 + linger) {
            emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"ETIMEDOUT\", \"why\": \"connect\"", idx);
            return 1;
        }
        if (up && t >= next && t < stop) {
            line_for(want, idx, sent);
            ssize_t w = send(fd, want, LINE, MSG_NOSIGNAL);
            if (w == LINE) {
                sent++;
            } else if (w < 0 && errno != EAGAIN) {
                emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\", \"why\": \"send\"",
                     idx, errname(errno));
                return 1;
            } /* a short or blocked send: the line is resent whole next tick (never happens at this rate) */
            next += interval / 1e3;
            if (next < t) next = t + interval / 1e3;
        }
        if (t >= stop && answered == sent) break;
        if (t >= stop + linger) {
            emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"ETIMEDOUT\", \"why\": \"unanswered\"", idx);
            break;
        }
        struct pollfd p = {fd, up ? POLLIN : POLLOUT, 0};
        int wait = (int)((next - t) * 1e3);
        if (wait < 0) wait = 0;
        if (wait > 100) wait = 100;
        if (poll(&p, 1, wait) <= 0) continue;
        if (!up) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", idx, errname(err));
                return 1;
            }
            struct sockaddr_in l;
            socklen_t ll = sizeof l;
            getsockname(fd, (struct sockaddr *)&l, &ll);
            char ls[32];
            inet_ntop(AF_INET, &l.sin_addr, ls, sizeof ls);
            up = 1;
            next = now();
            emit("\"ev\": \"established\", \"idx\": %d, \"side\": \"client\", \"local\": [\"%s\", %d], "
                 "\"remote\": [\"%s\", %d]", idx, ls, ntohs(l.sin_port), dst, port);
            continue;
        }
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            if (soft(errno) && !dead(fd)) {
                emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", idx, errname(errno));
                drain_errqueue(fd);
                continue;
            }
            emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"%s\"", idx, errname(errno));
            return 1;
        }
        if (r == 0) {
            emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"client\", \"err\": \"EOF\"", idx);
            return 1;
        }
        echoed += r;
        for (ssize_t i = 0; i < r; i++) {
            got[have++] = buf[i];
            if (have < LINE) continue;
            have = 0;
            line_for(want, idx, answered);
            if (memcmp(got, want, LINE) != 0) mismatches++;
            emit("\"ev\": \"answer\", \"idx\": %d, \"side\": \"client\", \"seq\": %ld, \"ok\": %s",
                 idx, answered, memcmp(got, want, LINE) == 0 ? "true" : "false");
            answered++;
        }
    }
    emit("\"ev\": \"done\", \"idx\": %d, \"side\": \"client\", \"sent\": %ld, \"answered\": %ld, "
         "\"bytes_sent\": %ld, \"bytes_echoed\": %ld, \"mismatches\": %ld",
         idx, sent, answered, sent * LINE, echoed, mismatches);
    close(fd);
    return mismatches ? 1 : 0;
}

static int server(int idx, int port, int timeout) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 16) < 0) {
        emit("\"ev\": \"bad_command\", \"op\": \"server\", \"err\": \"%s\"", errname(errno));
        return 2;
    }
    emit("\"ev\": \"listening\", \"idx\": %d, \"side\": \"server\", \"port\": %d", idx, port);
    struct pollfd p[MAXCONN + 1];
    long echoed[MAXCONN + 1];
    int n = 1;
    p[0] = (struct pollfd){ls, POLLIN, 0};
    char buf[4096];
    for (;;) {
        if (poll(p, n, -1) < 0) continue;
        if (p[0].revents & POLLIN && n <= MAXCONN) {
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            int c = accept(ls, (struct sockaddr *)&from, &fl);
            if (c >= 0) {
                tune(c, timeout);
                char a[32];
                inet_ntop(AF_INET, &from.sin_addr, a, sizeof a);
                emit("\"ev\": \"saw\", \"idx\": %d, \"side\": \"server\", \"address\": \"%s\", \"port\": %d",
                     idx, a, ntohs(from.sin_port));
                echoed[n] = 0;
                p[n++] = (struct pollfd){c, POLLIN, 0};
            }
        }
        for (int i = 1; i < n; i++) {
            if (!p[i].revents) continue;
            ssize_t r = recv(p[i].fd, buf, sizeof buf, 0);
            int err = r < 0 ? errno : 0;
            if (r < 0 && (err == EAGAIN || err == EINTR)) continue;
            if (r < 0 && soft(err) && !dead(p[i].fd)) {
                emit("\"ev\": \"error\", \"idx\": %d, \"side\": \"server\", \"err\": \"%s\"", idx, errname(err));
                drain_errqueue(p[i].fd);
                continue;
            }
            if (r > 0) { /* echo it all (blocking on a full buffer is fine at these rates) */
                int fl = fcntl(p[i].fd, F_GETFL);
                fcntl(p[i].fd, F_SETFL, fl & ~O_NONBLOCK);
                ssize_t w = send(p[i].fd, buf, r, MSG_NOSIGNAL);
                fcntl(p[i].fd, F_SETFL, fl);
                if (w == r) {
                    echoed[i] += r;
                    continue;
                }
                err = w < 0 ? errno : EPIPE;
            }
            if (r == 0) /* the client's orderly close: it closes only after its "done" */
                emit("\"ev\": \"closed\", \"idx\": %d, \"side\": \"server\", \"echoed\": %ld", idx, echoed[i]);
            else
                emit("\"ev\": \"broken\", \"idx\": %d, \"side\": \"server\", \"err\": \"%s\", \"echoed\": %ld",
                     idx, errname(err), echoed[i]);
            close(p[i].fd);
            p[i] = p[n - 1];
            echoed[i] = echoed[n - 1];
            n--;
            i--;
        }
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 2 && strcmp(argv[1], "serve") == 0) return serve();
    if (argc == 8 && strcmp(argv[1], "client") == 0)
        return client(atoi(argv[2]), argv[3], atoi(argv[4]), atoi(argv[5]), atoi(argv[6]), atoi(argv[7]));
    if (argc == 5 && strcmp(argv[1], "server") == 0)
        return server(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: roam-ep serve\n"
                    "       roam-ep client IDX DST PORT INTERVAL_MS TIMEOUT_MS DURATION_MS\n"
                    "       roam-ep server IDX PORT TIMEOUT_MS\n");
    return 2;
}
