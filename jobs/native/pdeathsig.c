/* jobsite-pdeathsig PARENT_PID COMMAND [ARG...]
 *
 * Run COMMAND so that it gets SIGKILL when the worker that started it dies,
 * the way `setpriv --pdeathsig KILL --` does, at half its cost: a static
 * binary with nothing to load before the exec. PARENT_PID is the worker's
 * pid; if the worker died before the signal was set, COMMAND never starts.
 * Built by `make install` (see the Makefile); jobs/execution.py falls back
 * to setpriv without it.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fputs("usage: jobsite-pdeathsig PARENT_PID COMMAND [ARG...]\n", stderr);
        return 2;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
        perror("jobsite-pdeathsig: prctl");
        return 126;
    }
    if (getppid() != (pid_t)strtol(argv[1], NULL, 10)) {
        return 128 + SIGKILL; /* the worker is already gone */
    }
    execvp(argv[2], argv + 2);
    fprintf(stderr, "jobsite-pdeathsig: %s: %s\n", argv[2], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
