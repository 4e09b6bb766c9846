/* What a result file costs an exec task, against what starting the task costs: ROUNDS
 * times, N result files made and taken as taskd does (create 0600 with O_EXCL|O_NOFOLLOW,
 * fchmod, close; open with O_NOFOLLOW|O_NONBLOCK, fstat, close; unlink; nothing written,
 * the common case), then M spawns and waits of /bin/true; prints both per task and their
 * ratio, round by round. DIR must be on the state directory's file system.
 * Usage: result_file DIR [ROUNDS N M]   (cc -O2 -o result_file bench/result_file.c) */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR [ROUNDS N M]\n", argv[0]);
        return 2;
    }
    int rounds = argc > 2 ? atoi(argv[2]) : 5, n = argc > 3 ? atoi(argv[3]) : 20000,
        m = argc > 4 ? atoi(argv[4]) : 2000;
    char path[4096];
    for (int r = 0; r < rounds; r++) {
        double t0 = now();
        for (int i = 0; i < n; i++) {
            snprintf(path, sizeof path, "%s/%016lx%08x", argv[1], random(), i);
            int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (fd < 0) { perror(path); return 1; }
            fchmod(fd, 0600);
            close(fd);
            fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
            struct stat st;
            fstat(fd, &st);
            close(fd);
            unlink(path);
        }
        double file = (now() - t0) / n;
        t0 = now();
        for (int i = 0; i < m; i++) {
            pid_t p;
            char *a[] = {"/bin/true", 0};
            if (posix_spawn(&p, "/bin/true", 0, 0, a, environ) != 0) { perror("spawn"); return 1; }
            int s;
            waitpid(p, &s, 0);
        }
        double spawn = (now() - t0) / m;
        printf("round %d: result file %.1f us, spawn and wait of /bin/true %.1f us, ratio %.3f\n",
               r + 1, file * 1e6, spawn * 1e6, file / spawn);
    }
    return 0;
}
