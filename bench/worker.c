/* The smallest taskd worker (protocol 1, docs/worker-protocol.md), for bench/workers.py:
 * answers every task on fd 3 with {"type":"result","id":ID,"status":"ok"} on fd 4.
 * Reads and writes in large chunks: several tasks may arrive in one read. */
#include <string.h>
#include <unistd.h>
#include <errno.h>

static char in[1 << 16];
static char out[1 << 16];

static int put(const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(4, s, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(void) {
    static const char ready[] = "{\"type\":\"ready\",\"protocol\":1}\n";
    if (put(ready, sizeof ready - 1) < 0) return 1;
    size_t have = 0;
    for (;;) {
        ssize_t r = read(3, in + have, sizeof in - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return 0; /* taskd closed the task pipe: stop */
        have += (size_t)r;
        size_t start = 0, o = 0;
        char *nl;
        while ((nl = memchr(in + start, '\n', have - start)) != NULL) {
            char *id = strstr(in + start, "\"id\":\"");
            if (id == NULL || id > nl) return 2;
            id += 6;
            char *end = memchr(id, '"', (size_t)(nl - id));
            if (end == NULL) return 2;
            size_t n = (size_t)(end - id);
            if (o + n + 64 > sizeof out) {
                if (put(out, o) < 0) return 1;
                o = 0;
            }
            memcpy(out + o, "{\"type\":\"result\",\"id\":\"", 23);
            o += 23;
            memcpy(out + o, id, n);
            o += n;
            memcpy(out + o, "\",\"status\":\"ok\"}\n", 17);
            o += 17;
            start = (size_t)(nl - in) + 1;
        }
        if (o > 0 && put(out, o) < 0) return 1;
        memmove(in, in + start, have - start);
        have -= start;
        if (have == sizeof in) return 3; /* a task line over 64 KiB: not for this bench */
    }
}
