/* The test node's pod sandbox process: sleeps until SIGTERM or SIGINT, reaps zombies. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction s = {0};
  s.sa_handler = stop;
  sigaction(SIGINT, &s, 0);
  sigaction(SIGTERM, &s, 0);
  struct sigaction r = {0};
  r.sa_handler = reap;
  r.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &r, 0);
  for (;;) pause();
}
