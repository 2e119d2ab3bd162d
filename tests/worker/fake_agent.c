/*
 * A stand-in for the guest agent in container-driver tests (the real agent is Python and
 * lives in scaigrid.agent). Static, so it runs in any image root.
 *
 *   fake-agent --listen PATH   PID 1 mode: accept on the unix socket PATH; each connection
 *                              sends one line, run as `/bin/sh -c LINE` with stdout and
 *                              stderr on the connection, then "\n__RC__ <status>\n".
 *                              SIGUSR1 makes PID 1 exit with status 3.
 *   fake-agent --hog MIB       allocate and touch MIB MiB, print "allocated MIB", sleep.
 *
 * Children get oom_score_adj 0, as the real agent's do.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static void leave(int sig) {
    (void)sig;
    _exit(3);
}

static void handle(int conn) {
    char cmd[8192];
    size_t n = 0;
    while (n < sizeof(cmd) - 1) {
        ssize_t r = read(conn, cmd + n, 1);
        if (r <= 0 || cmd[n] == '\n') break;
        n++;
    }
    cmd[n] = 0;
    if (n == 0) return;
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY);
        if (fd >= 0) {
            (void)!write(fd, "0", 1);
            close(fd);
        }
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
        dup2(conn, 1);
        dup2(conn, 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    char out[64];
    if (pid < 0) {
        snprintf(out, sizeof(out), "\n__RC__ fork-failed\n");
    } else {
        int status = 0;
        waitpid(pid, &status, 0);
        snprintf(out, sizeof(out), "\n__RC__ %d\n",
                 WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    (void)!write(conn, out, strlen(out));
}

static int hog(long mib) {
    for (long i = 0; i < mib; i++) {
        char *p = malloc(1 << 20);
        if (!p) {
            printf("malloc failed at %ld\n", i);
            return 1;
        }
        memset(p, 1, 1 << 20);
    }
    printf("allocated %ld\n", mib);
    fflush(stdout);
    pause();
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--hog") == 0) return hog(atol(argv[2]));
    if (argc != 3 || strcmp(argv[1], "--listen") != 0) {
        fprintf(stderr, "usage: fake-agent --listen PATH | --hog MIB\n");
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = reap;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGUSR1, leave);
    int srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[2], sizeof(addr.sun_path) - 1);
    unlink(argv[2]);
    if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(srv, 64) < 0) {
        perror("listen");
        return 1;
    }
    for (;;) {
        int conn = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) continue;
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGCHLD, SIG_DFL);
            signal(SIGUSR1, SIG_DFL);
            close(srv);
            handle(conn);
            _exit(0);
        }
        close(conn);
    }
}
