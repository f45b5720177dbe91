// The floor under any dflockd client's CPU per op on this machine: the dflockd-bench
// throughput workload (W workers x R rounds of acquire + release, each worker on its own key
// and persistent connection) done with nothing but epoll and one write per request, no
// validation, no allocation, no error handling worth the name. What it spends is, almost
// all of it, the kernel's cost of loopback TCP; a real client cannot spend less.
//
//   floor --port P [--workers 100] [--rounds 500] [--lease 10] [--timeout 30]
//         [--batching-window-us N] [--json]
//
// --batching-window-us does what EventLoop(batchingWindow:) does: after an epoll_wait that
// returned more than one ready socket, sleep that long before the next one.
//
// Not a client: it trusts the server, and any reply it does not expect ends the run.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum phase { ACQUIRING, RELEASING };

struct worker {
    int fd;
    enum phase phase;
    int rounds_done;
    long long op_started_ns;
    char key[48];
    char token[80];
    char input[512];
    size_t input_len;
};

static int g_rounds = 500, g_lease = 10, g_timeout = 30;
static double *g_latencies_ms;
static long g_ops;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static double cpu_s(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "floor: %s: %s\n", what, errno ? strerror(errno) : "unexpected");
    exit(1);
}

static void send_text(struct worker *w, const char *text, int length) {
    if (write(w->fd, text, (size_t)length) != length) die("write");
}

static void send_acquire(struct worker *w) {
    char request[160];
    int length = snprintf(request, sizeof request, "l\n%s\n%d %d\n", w->key, g_timeout, g_lease);
    w->phase = ACQUIRING;
    w->op_started_ns = now_ns();
    send_text(w, request, length);
}

static void send_release(struct worker *w) {
    char request[160];
    int length = snprintf(request, sizeof request, "r\n%s\n%s\n", w->key, w->token);
    w->phase = RELEASING;
    send_text(w, request, length);
}

// One reply line (without its newline); returns 1 when the worker has finished its rounds.
static int on_reply(struct worker *w, char *line) {
    if (w->phase == ACQUIRING) {
        char *token_end;
        if (strncmp(line, "ok ", 3) != 0 || !(token_end = strchr(line + 3, ' ')) || token_end - (line + 3) >= (long)sizeof w->token) {
            fprintf(stderr, "floor: acquire answered %s\n", line);
            exit(1);
        }
        *token_end = 0;
        strcpy(w->token, line + 3);
        send_release(w);
        return 0;
    }
    if (strcmp(line, "ok") != 0) {
        fprintf(stderr, "floor: release answered %s\n", line);
        exit(1);
    }
    g_latencies_ms[g_ops++] = (now_ns() - w->op_started_ns) / 1e6;
    if (++w->rounds_done == g_rounds) return 1;
    send_acquire(w);
    return 0;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// The Go tool's percentile: linear interpolation between closest ranks.
static double percentile(const double *sorted, long count, double pct) {
    double rank = pct / 100.0 * (double)(count - 1);
    long low = (long)rank;
    if (low + 1 >= count) return sorted[low];
    return sorted[low] + (sorted[low + 1] - sorted[low]) * (rank - (double)low);
}

int main(int argc, char **argv) {
    int port = 0, workers = 100, window_us = 0, json = 0;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(flag, "--json") == 0) { json = 1; continue; }
        if (!value) { fprintf(stderr, "floor: %s needs a value\n", flag); return 2; }
        i++;
        if (strcmp(flag, "--port") == 0) port = atoi(value);
        else if (strcmp(flag, "--workers") == 0) workers = atoi(value);
        else if (strcmp(flag, "--rounds") == 0) g_rounds = atoi(value);
        else if (strcmp(flag, "--lease") == 0) g_lease = atoi(value);
        else if (strcmp(flag, "--timeout") == 0) g_timeout = atoi(value);
        else if (strcmp(flag, "--batching-window-us") == 0) window_us = atoi(value);
        else if (strcmp(flag, "--servers") == 0) { const char *colon = strrchr(value, ':'); port = colon ? atoi(colon + 1) : 0; }
        else { fprintf(stderr, "floor: unknown flag %s\n", flag); return 2; }
    }
    if (port <= 0 || port > 65535 || workers < 1 || g_rounds < 1 || g_lease < 1 || window_us < 0) {
        fprintf(stderr, "usage: floor --port P [--workers N] [--rounds N] [--lease S] [--timeout S] [--batching-window-us N] [--json]\n");
        return 2;
    }

    struct worker *pool = calloc((size_t)workers, sizeof *pool);
    g_latencies_ms = calloc((size_t)workers * (size_t)g_rounds, sizeof *g_latencies_ms);
    if (!pool || !g_latencies_ms) die("calloc");
    srand((unsigned)now_ns());
    double cpu_start = cpu_s();
    long long wall_start = now_ns();
    int epoll = epoll_create1(0);
    if (epoll < 0) die("epoll_create1");
    struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < workers; i++) {
        struct worker *w = &pool[i];
        int on = 1;
        w->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (w->fd < 0) die("socket");
        setsockopt(w->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        if (connect(w->fd, (struct sockaddr *)&address, sizeof address) != 0) die("connect");
        snprintf(w->key, sizeof w->key, "floor_%08x_%d", (unsigned)rand(), i);
        struct epoll_event interest = { .events = EPOLLIN, .data.ptr = w };
        if (epoll_ctl(epoll, EPOLL_CTL_ADD, w->fd, &interest) != 0) die("epoll_ctl");
    }
    for (int i = 0; i < workers; i++) send_acquire(&pool[i]);

    struct timespec window = { .tv_sec = window_us / 1000000, .tv_nsec = (long)(window_us % 1000000) * 1000 };
    struct epoll_event ready[256];
    int busy = 0, running = workers;
    while (running > 0) {
        if (busy && window_us > 0) nanosleep(&window, NULL);
        int count = epoll_wait(epoll, ready, 256, -1);
        if (count < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        busy = count > 1;
        for (int k = 0; k < count; k++) {
            struct worker *w = ready[k].data.ptr;
            ssize_t got = read(w->fd, w->input + w->input_len, sizeof w->input - 1 - w->input_len);
            if (got <= 0) die(got == 0 ? "the server closed a connection" : "read");
            w->input_len += (size_t)got;
            char *newline;
            while ((newline = memchr(w->input, '\n', w->input_len))) {
                *newline = 0;
                size_t used = (size_t)(newline + 1 - w->input);
                int finished = on_reply(w, w->input);
                memmove(w->input, newline + 1, w->input_len - used);
                w->input_len -= used;
                if (finished) { running--; close(w->fd); break; }
            }
        }
    }
    double wall_s = (now_ns() - wall_start) / 1e9;
    double cpu_us_per_op = (cpu_s() - cpu_start) / (double)g_ops * 1e6;
    qsort(g_latencies_ms, (size_t)g_ops, sizeof *g_latencies_ms, compare_doubles);
    double p50 = percentile(g_latencies_ms, g_ops, 50), p99 = percentile(g_latencies_ms, g_ops, 99);
    if (json) {
        printf("{\"mode\": \"floor\", \"batching_window_us\": %d, \"total_ops\": %ld, \"wall_time_s\": %.6f, "
               "\"throughput_ops_per_s\": %.3f, \"p50_ms\": %.6f, \"p99_ms\": %.6f, \"cpu_us_per_op\": %.3f}\n",
               window_us, g_ops, wall_s, g_ops / wall_s, p50, p99, cpu_us_per_op);
    } else {
        printf("floor: %ld ops in %.3f s: %.1f ops/s, p50 %.3f ms, p99 %.3f ms, cpu/op %.2f us (batching window %d us)\n",
               g_ops, wall_s, g_ops / wall_s, p50, p99, cpu_us_per_op, window_us);
    }
    return 0;
}
