/* inotify-hog N [hold]: create up to N inotify instances, print "<created> <ok|error>", and
 * with "hold" keep them open until killed. Built statically by tests/worker/test_userns_owner.py
 * and run inside bunkers (the busybox image has no inotify tool). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: inotify-hog N [hold]\n");
        return 2;
    }
    long want = strtol(argv[1], NULL, 10);
    long created = 0;
    int error = 0;
    while (created < want) {
        if (inotify_init1(IN_CLOEXEC) < 0) {
            error = errno;
            break;
        }
        created++;
    }
    printf("%ld %s\n", created, error ? strerror(error) : "ok");
    fflush(stdout);
    if (argc > 2 && strcmp(argv[2], "hold") == 0) {
        for (;;) {
            pause();
        }
    }
    return error ? 1 : 0;
}
