/*
 * scaibunker-spawn: the second half of starting an exec (see scaigrid/agent/spawn.py).
 *
 * The agent starts this program with posix_spawn(), which clones without copying the
 * agent's memory: the new process is already in the exec's own session, with the exec's
 * stdin, stdout and stderr, and runs as root. This program then does what a forked copy
 * of the agent would do before exec, in the same order:
 *
 *   1. every signal disposition back to the default, an empty signal mask;
 *   2. join each given cgroup (write "0" to its cgroup.procs; failures are ignored);
 *   3. write oom_score_adj (failures are ignored);
 *   4. when running as root: take on the supplementary groups, gid and uid;
 *   5. umask 022, enter the working directory (as the new user);
 *   6. execute the command (looked up on the environment's PATH when asked).
 *
 * If the working directory or the command cannot be used, the reason goes to stderr as
 * "scaibunker: ..." and the exit status is 127 (126 when the command exists but cannot be
 * executed), exactly as spawn.py's fork path reports it.
 *
 * Usage (only the agent calls it; the environment is the exec's own):
 *
 *   scaibunker-spawn UID GID GROUPS OOM_SCORE_ADJ SEARCH CWD NPROCS [PROCS...] ARGV...
 *
 *   GROUPS   comma-separated supplementary gids ("" for none)
 *   SEARCH   "1": look ARGV[0] up on PATH when it has no slash (as os.execvpe); "0": not
 *   NPROCS   how many cgroup.procs paths follow
 *
 * Built statically when the agent runtime tree is built, so it runs in any image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_GROUPS 64
#define KERNEL_SIGNALS 64

/* The kernel's struct sigaction on x86_64 and aarch64 (both have sa_restorer). */
struct kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

extern char **environ;

static void fail(const char *what, const char *subject, int err, int status)
{
    dprintf(2, "scaibunker: %s%s: %s\n", what, subject, strerror(err));
    _exit(status);
}

static void bad_usage(void)
{
    dprintf(2, "scaibunker: cannot start process: bad helper arguments\n");
    _exit(127);
}

static long number(const char *text, long min, long max)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > max)
        bad_usage();
    return value;
}

static void write_quietly(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    (void)!write(fd, value, strlen(value));
    close(fd);
}

/* os.execvpe's search: each PATH entry in order ("" is the working directory); the
 * first error other than ENOENT/ENOTDIR wins, else the last one. Returns that errno. */
static int exec_on_path(const char *file, char *const argv[])
{
    const char *path = getenv("PATH");
    if (path == NULL)
        path = "/bin:/usr/bin";
    size_t file_len = strlen(file);
    int saved = 0, last = ENOENT;
    for (const char *entry = path;;) {
        const char *colon = strchr(entry, ':');
        size_t dir_len = colon != NULL ? (size_t)(colon - entry) : strlen(entry);
        char *full = malloc(dir_len + file_len + 2);
        if (full == NULL)
            return ENOMEM;
        size_t at = 0;
        if (dir_len > 0) {
            memcpy(full, entry, dir_len);
            at = dir_len;
            if (entry[dir_len - 1] != '/')
                full[at++] = '/';
        }
        memcpy(full + at, file, file_len + 1);
        execve(full, argv, environ);
        last = errno;
        if (last != ENOENT && last != ENOTDIR && saved == 0)
            saved = last;
        free(full);
        if (colon == NULL)
            break;
        entry = colon + 1;
    }
    return saved != 0 ? saved : last;
}

int main(int argc, char **argv)
{
    if (argc < 9)
        bad_usage();
    uid_t uid = (uid_t)number(argv[1], 0, UINT_MAX - 1);
    gid_t gid = (gid_t)number(argv[2], 0, UINT_MAX - 1);
    gid_t groups[MAX_GROUPS];
    int group_count = 0;
    for (char *rest = argv[3]; *rest != '\0';) {
        char *comma = strchr(rest, ',');
        if (comma != NULL)
            *comma = '\0';
        if (group_count == MAX_GROUPS)
            bad_usage();
        groups[group_count++] = (gid_t)number(rest, 0, UINT_MAX - 1);
        if (comma == NULL)
            break;
        rest = comma + 1;
    }
    const char *oom_score_adj = argv[4];
    number(oom_score_adj, -1000, 1000);
    int search = (int)number(argv[5], 0, 1);
    const char *cwd = argv[6];
    long procs = number(argv[7], 0, argc - 9);
    char **command = argv + 8 + procs;

    /* The raw system call, as glibc refuses to touch its internal signals (32 and 33),
     * which its posix_spawn() leaves ignored: the command must find them at default. */
    struct kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.handler = SIG_DFL;
    for (int sig = 1; sig <= KERNEL_SIGNALS; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    for (long i = 0; i < procs; i++)
        write_quietly(argv[8 + i], "0");
    write_quietly("/proc/self/oom_score_adj", oom_score_adj);
    if (geteuid() == 0) {
        if (setgroups((size_t)group_count, groups) != 0 || setresgid(gid, gid, gid) != 0 ||
            setresuid(uid, uid, uid) != 0)
            fail("cannot start process: cannot switch user", "", errno, 127);
    }
    umask(022);
    if (chdir(cwd) != 0)
        fail("cannot enter working directory ", cwd, errno, 127);
    int err;
    if (search && strchr(command[0], '/') == NULL) {
        err = exec_on_path(command[0], command);
    } else {
        execve(command[0], command, environ);
        err = errno;
    }
    fail("cannot run ", command[0], err, err == ENOENT || err == ENOTDIR ? 127 : 126);
    return 127;
}
