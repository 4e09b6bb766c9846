/* The floor: run N copies of a program with P at a time, by fork+exec and waitpid, and
 * nothing else. It is the physical limit of spawning processes on this machine, the peer
 * taskd's dispatch is measured against.  Usage: floor P N PROGRAM [ARGS...] */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s P N PROGRAM [ARGS...]\n", argv[0]);
        return 2;
    }
    int p = atoi(argv[1]), n = atoi(argv[2]), started = 0, running = 0;
    while (started < n || running > 0) {
        while (running < p && started < n) {
            pid_t pid = fork();
            if (pid == 0) {
                execv(argv[3], &argv[3]);
                _exit(127);
            }
            if (pid < 0) { perror("fork"); return 1; }
            started++;
            running++;
        }
        int status;
        if (wait(&status) > 0) running--;
    }
    return 0;
}
