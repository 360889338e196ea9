/*
 * ceiling.c — the "physical limit" reference for benches/load/run.sh.
 *
 * A minimal single-threaded epoll HTTP server: for every request it reads
 * (everything up to "\r\n\r\n", several per connection, pipelined or
 * keep-alive) it writes one canned "200 OK" whose body has the same size as
 * fdtserver's and nginx's. It parses nothing else, allocates nothing per
 * request and never logs, so its throughput is what the kernel's loopback
 * path allows on one vCPU; a real server can only come close to it.
 *
 * Usage: ceiling PORT [BODY]     (listens on 127.0.0.1:PORT; BODY defaults
 *                                 to "Hello, world!")
 * Build: gcc -O2 -o ceiling ceiling.c
 * Stops on SIGTERM/SIGINT (default action).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_CAP 8192      /* a request larger than this is refused (closed) */
#define OUT_CAP 16384    /* room for ~100 pipelined responses */
#define MAX_EVENTS 256

struct conn {
    int fd;
    size_t in_len;               /* bytes of an incomplete request kept */
    size_t out_len, out_off;     /* responses not yet written */
    char in[IN_CAP];
    char out[OUT_CAP];
};

static char response[512];
static size_t response_len;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Writes what is pending; returns 0 when all is written, 1 when the socket
 * is full (wait for EPOLLOUT), -1 when the connection is gone. */
static int flush_out(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 1;
        } else {
            return -1;
        }
    }
    c->out_len = c->out_off = 0;
    return 0;
}

/* Turns every complete request in c->in into one canned response in c->out
 * and keeps the incomplete tail. Returns -1 if the buffer holds a request
 * that cannot fit. */
static int take_requests(struct conn *c) {
    size_t start = 0;
    for (;;) {
        char *end = memmem(c->in + start, c->in_len - start, "\r\n\r\n", 4);
        if (end == NULL)
            break;
        if (c->out_len + response_len > OUT_CAP)
            break; /* flush first; the rest stays in c->in */
        memcpy(c->out + c->out_len, response, response_len);
        c->out_len += response_len;
        start = (size_t)(end - c->in) + 4;
    }
    if (start > 0) {
        memmove(c->in, c->in + start, c->in_len - start);
        c->in_len -= start;
    }
    return c->in_len == IN_CAP ? -1 : 0;
}

static void set_events(int ep, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl MOD");
}

/* Answers every complete request buffered so far, writing as it goes.
 * Returns -1 when the connection must be closed. */
static int answer(int ep, struct conn *c) {
    for (;;) {
        if (take_requests(c) < 0)
            return -1;
        if (c->out_len == 0)
            return 0;
        int r = flush_out(c);
        if (r < 0)
            return -1;
        if (r > 0) {
            set_events(ep, c, EPOLLOUT); /* stop reading until it drains */
            return 0;
        }
    }
}

/* One readiness event on a connection. Level triggered, so one read per
 * wake-up is enough and keeps connections fair. */
static void on_conn(int ep, struct conn *c, unsigned events) {
    if (c->out_len > 0) {
        /* Only here when waiting for EPOLLOUT: finish the pending write. */
        int r = flush_out(c);
        if (r > 0)
            return;
        if (r == 0) {
            set_events(ep, c, EPOLLIN);
            r = answer(ep, c); /* requests left behind by a full buffer */
        }
        if (r < 0)
            close_conn(ep, c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close_conn(ep, c);
            return;
        }
        if (n > 0)
            c->in_len += (size_t)n;
        if (answer(ep, c) < 0)
            close_conn(ep, c);
    }
}

static void on_listener(int ep, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or EMFILE and friends: try on the next event */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = malloc(sizeof *c);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->in_len = c->out_len = c->out_off = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s PORT [BODY]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    const char *body = argc == 3 ? argv[2] : "Hello, world!";
    int len = snprintf(response, sizeof response,
                       "HTTP/1.1 200 OK\r\n"
                       "Server: ceiling\r\n"
                       "Content-Type: text/plain\r\n"
                       "Content-Length: %zu\r\n"
                       "Connection: keep-alive\r\n"
                       "\r\n%s",
                       strlen(body), body);
    if (port <= 0 || port > 65535 || len < 0 || (size_t)len >= sizeof response) {
        fprintf(stderr, "ceiling: bad port or body too long\n");
        return 2;
    }
    response_len = (size_t)len;

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(lfd, 4096) < 0) /* same backlog as the nginx reference */
        die("listen");

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0)
        die("epoll_ctl ADD listener");

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                on_listener(ep, lfd);
            else
                on_conn(ep, events[i].data.ptr, events[i].events);
        }
    }
}
