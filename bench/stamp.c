/* Append "<CLOCK_REALTIME ns> <TASKD_TASK_ID>\n" to the file named by argv[1]: the moment a
 * task's process started, for the submit-to-start latency benchmark. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (argc < 2) return 2;
    const char *id = getenv("TASKD_TASK_ID");
    char line[128];
    int len = snprintf(line, sizeof line, "%lld %s\n",
                       (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, id ? id : "-");
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) return 1;
    if (write(fd, line, len) != len) return 1;
    return close(fd);
}
