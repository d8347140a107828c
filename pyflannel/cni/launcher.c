/*
 * `flannel`, the executable the container runtime calls for every pod and command: a small static client of
 * flanneld's CNI server (pyflannel/cniserver.py; its docstring has the protocol), which runs the plugin's code
 * without a Python start per call, and otherwise a launcher of the standalone Python plugin.
 *
 * Served: the environment (as the Python plugin would see it, see python_locale()), stdin (read whole, at most
 * the plugin's 16 MiB) and this process's stderr (SCM_RIGHTS: the delegates write there) go to the socket
 * $FLANNEL_CNI_SOCKET (default /run/flannel/cni.sock); the reply's stderr and stdout bytes are written out
 * and its exit status is ours. Nothing is written before the reply is complete.
 *
 * Standalone, with the same stdin (what was read of it goes back as fd 0 in a memfd), environment and
 * arguments: when there is no socket, it refuses the connection (no agent, a dead agent's file, not root), the
 * agent closes it before a complete reply (restarting), refuses the request, or stays silent for 5 minutes;
 * and where serving could answer otherwise than the standalone plugin: a standard descriptor closed, stdin that
 * cannot be read or is over the cap, an environment over the protocol's caps, a locale whose encoding is not
 * UTF-8. FLANNEL_CNI_SOCKET="" turns serving off.
 *
 * The standalone plugin is found from /proc/self/exe (the resolved path), never from argv[0] or PATH
 * (/opt/cni/bin/flannel is a symlink into a copied directory). scripts/build-cni.sh's build execs the bundled
 * interpreter beside it: python/python3.11 -I -S -B main.py (-I keeps the runtime's PYTHON* variables and the
 * cwd out, -S skips site, -B never writes bytecode into the host's plugin directory). The venv build
 * (pyflannel/cni/launcher.py, -DSTANDALONE_SUFFIX='"-py"') execs the Python launcher script next to it, named
 * after it plus "-py".
 *
 * Static, no allocation but the bounded buffers below (the reply's is mapped at its announced size), every
 * call checked, EINTR retried (a stop and continue interrupts calls on a socket with a timeout).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <langinfo.h>
#include <limits.h>
#include <locale.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/flannel/cni.sock"
#define MAX_STDIN (16u << 20)    /* pyflannel.cni.plugin.MAX_STDIN */
#define MAX_ENV_COUNT 4096u      /* these three: pyflannel/cniserver.py */
#define MAX_ENV_BYTES (1u << 20)
#define MAX_REPLY (256u << 20)
#define PROTOCOL 1
#define REQUEST_HEAD 20
#define REPLY_HEAD 16
#define REPLY_TIMEOUT_S 300 /* a CNI ADD can be slow; never hang for ever */
#define MAX_ARGS 256

#define PYTHON "/python/python3.11"
#define MAIN "/main.py"

extern char **environ;

static unsigned char stdin_buf[MAX_STDIN + 1];
static char env_buf[MAX_ENV_BYTES];

/* A CNI error on stdout, as the runtime expects from any failing plugin (code 999: generic), in the plugin's
 * layout (libcni's types.Error.Print() plus cniVersion; no trailing newline). The texts are fixed ASCII or
 * strerror's: nothing to escape. */
static int fail(const char *msg, const char *detail) {
  printf("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 999,\n    \"msg\": \"flannel launcher: %s\"", msg);
  if (detail[0] != '\0') printf(",\n    \"details\": \"%s\"", detail);
  printf("\n}");
  return 1;
}

static int write_all(int fd, const void *data, size_t len) {
  const unsigned char *p = data;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Exactly `len` bytes; -1 on an error, a timeout or the end of the stream before them. */
/* -1 with errno set (EAGAIN: the receive timeout), or -1 with errno 0 at end of file. */
static int read_full(int fd, void *data, size_t len) {
  unsigned char *p = data;
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = 0;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* fd 0 becomes a file holding `data`: the standalone plugin reads what this process already read. */
static int stdin_from(const unsigned char *data, size_t len) {
  int fd = memfd_create("flannel-stdin", MFD_CLOEXEC);
  if (fd >= 0) {
    if (write_all(fd, data, len) < 0 || lseek(fd, 0, SEEK_SET) < 0) {
      int e = errno;
      close(fd);
      errno = e;
      return -1;
    }
  } else {
    /* No memfd (seccomp, an old kernel): a pipe, grown to hold it (a config is a few KiB). */
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -1;
    int cap = fcntl(p[1], F_GETPIPE_SZ);
    if (cap >= 0 && (size_t)cap < len && len <= INT_MAX) cap = fcntl(p[1], F_SETPIPE_SZ, (int)len);
    if (cap < 0 || (size_t)cap < len || write_all(p[1], data, len) < 0) {
      int e = cap < 0 || (size_t)cap >= len ? errno : EFBIG;
      close(p[0]);
      close(p[1]);
      errno = e;
      return -1;
    }
    close(p[1]);
    fd = p[0];
  }
  if (dup2(fd, 0) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  close(fd);
  return 0;
}

/* Replaces this process with the standalone plugin; `len` bytes of stdin were read already (0: none). */
static int standalone(int argc, char **argv, size_t len) {
  if (len > 0 && stdin_from(stdin_buf, len) < 0) return fail("cannot hand stdin to the standalone plugin", strerror(errno));
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return fail("cannot read /proc/self/exe", strerror(errno));
  exe[n] = '\0';
  if (argc > MAX_ARGS - 6) return fail("too many arguments", "");
  static char *args[MAX_ARGS];
#ifdef STANDALONE_SUFFIX
  char script[PATH_MAX];
  if ((size_t)snprintf(script, sizeof(script), "%s" STANDALONE_SUFFIX, exe) >= sizeof(script))
    return fail("path too long", "");
  args[0] = script;
  for (int j = 1; j < argc; j++) args[j] = argv[j];
  args[argc] = NULL;
  execv(script, args);
  return fail("cannot exec the standalone plugin", strerror(errno));
#else
  char *slash = strrchr(exe, '/');
  if (slash == NULL) return fail("unexpected /proc/self/exe", "no directory");
  *slash = '\0';
  char python[PATH_MAX], script[PATH_MAX];
  if ((size_t)snprintf(python, sizeof(python), "%s" PYTHON, exe) >= sizeof(python) ||
      (size_t)snprintf(script, sizeof(script), "%s" MAIN, exe) >= sizeof(script))
    return fail("path too long", "");
  /* python3.11 -I -S -B main.py ARGS...; argv[0] absolute: Python finds its prefix from it. */
  int i = 0;
  args[i++] = python;
  args[i++] = "-I";
  args[i++] = "-S";
  args[i++] = "-B";
  args[i++] = script;
  for (int j = 1; j < argc; j++) args[i++] = argv[j];
  args[i] = NULL;
  execv(python, args);
  return fail("cannot exec the bundled python", strerror(errno));
#endif
}

/* What Python does with the locale as it starts (PEP 538, PEP 540), which the standalone plugin's environment
 * and its decoding follow. Returns 0 when the encoding is UTF-8 (so serving decodes alike), with `*coerce` the
 * LC_CTYPE that Python would put into the environment (NULL: none): for the "C" locale without LC_ALL, the
 * first of its targets that exists. -1: another encoding. */
static int python_locale(const char **coerce) {
  *coerce = NULL;
  const char *loc = setlocale(LC_CTYPE, "");
  if (loc == NULL) loc = setlocale(LC_CTYPE, NULL); /* a locale that does not exist leaves "C" */
  if (loc == NULL) return -1;
  if (strcmp(loc, "C") != 0 && strcmp(loc, "POSIX") != 0) {
    const char *codeset = nl_langinfo(CODESET);
    return codeset != NULL && strcmp(codeset, "UTF-8") == 0 ? 0 : -1;
  }
  /* Python's UTF-8 mode in any case; and the coercion, for "C" only. */
  const char *all = getenv("LC_ALL");
  if (strcmp(loc, "C") != 0 || (all != NULL && all[0] != '\0')) return 0;
  static const char *const targets[] = {"C.UTF-8", "C.utf8", "UTF-8"};
  for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
    if (setlocale(LC_CTYPE, targets[i]) == NULL) continue;
    const char *codeset = nl_langinfo(CODESET);
    if (codeset != NULL && codeset[0] != '\0') {
      *coerce = targets[i];
      return 0;
    }
  }
  return 0;
}

static int env_add(size_t *used, uint32_t *count, const char *s) {
  size_t n = strlen(s) + 1;
  if (*count >= MAX_ENV_COUNT || n > MAX_ENV_BYTES - *used) return -1;
  memcpy(env_buf + *used, s, n);
  *used += n;
  (*count)++;
  return 0;
}

/* environ as Python's would be after a coercion: the first LC_CTYPE replaced, or one appended (glibc's setenv,
 * which Python calls). */
static int env_pack(const char *coerce, size_t *used, uint32_t *count) {
  char ctype[32];
  int pending = 0;
  if (coerce != NULL) {
    if ((size_t)snprintf(ctype, sizeof(ctype), "LC_CTYPE=%s", coerce) >= sizeof(ctype)) return -1;
    pending = 1;
  }
  for (char **e = environ; *e != NULL; e++) {
    const char *s = *e;
    if (pending && strncmp(s, "LC_CTYPE=", 9) == 0) {
      s = ctype;
      pending = 0;
    }
    if (env_add(used, count, s) < 0) return -1;
  }
  return pending ? env_add(used, count, ctype) : 0;
}

static void put32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int set_timeout(int s, int opt, int seconds) {
  struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
  return setsockopt(s, SOL_SOCKET, opt, &tv, sizeof(tv));
}

/* The request: head, environment and stdin, with fd 2 attached to the first bytes. */
static int send_request(int s, const unsigned char *head, size_t env_len, size_t in_len) {
  struct iovec iov[3] = {
      {.iov_base = (void *)head, .iov_len = REQUEST_HEAD},
      {.iov_base = env_buf, .iov_len = env_len},
      {.iov_base = stdin_buf, .iov_len = in_len},
  };
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  memset(&control, 0, sizeof(control));
  struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 3, .msg_control = control.buf, .msg_controllen = sizeof(control.buf)};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  int fd2 = 2;
  memcpy(CMSG_DATA(cm), &fd2, sizeof(int));
  struct iovec *v = iov;
  size_t left = 3;
  while (left > 0) {
    ssize_t n = sendmsg(s, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    msg.msg_control = NULL; /* the descriptor went with the first bytes */
    msg.msg_controllen = 0;
    size_t sent = (size_t)n;
    while (left > 0 && sent >= v->iov_len) {
      sent -= v->iov_len;
      v++;
      left--;
    }
    if (left > 0) {
      v->iov_base = (char *)v->iov_base + sent;
      v->iov_len -= sent;
    }
    msg.msg_iov = v;
    msg.msg_iovlen = left;
  }
  return 0;
}

int main(int argc, char **argv) {
  /* A closed standard descriptor: the standalone plugin opens /dev/null there, as Go's runtime does (and a
   * socket must not take its number). */
  for (int fd = 0; fd < 3; fd++)
    if (fcntl(fd, F_GETFD) < 0) return standalone(argc, argv, 0);

  const char *path = getenv("FLANNEL_CNI_SOCKET");
  if (path == NULL) path = DEFAULT_SOCKET;
  struct sockaddr_un addr;
  memset(&addr, 0, sizeof(addr));
  addr.sun_family = AF_UNIX;
  size_t plen = strlen(path);
  if (plen == 0 || plen >= sizeof(addr.sun_path)) return standalone(argc, argv, 0);
  memcpy(addr.sun_path, path, plen + 1);

  const char *coerce;
  size_t env_len = 0;
  uint32_t env_count = 0;
  if (python_locale(&coerce) < 0 || env_pack(coerce, &env_len, &env_count) < 0) return standalone(argc, argv, 0);

  /* Connected before stdin is read: with no agent (the usual reason to fall back) stdin stays untouched. Not
   * blocking: a full listen backlog (every worker busy, more waiting) is EAGAIN at once, and the standalone
   * plugin is quicker than the wait. */
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return standalone(argc, argv, 0);
  int flags;
  if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0 || (flags = fcntl(s, F_GETFL)) < 0 ||
      fcntl(s, F_SETFL, flags & ~O_NONBLOCK) < 0) {
    close(s);
    return standalone(argc, argv, 0);
  }

  /* The plugin reads no stdin for VERSION or without a command: neither does the client (a runtime need not
   * close it then). */
  const char *command = getenv("CNI_COMMAND");
  int wants_stdin = command != NULL && command[0] != '\0' && strcmp(command, "VERSION") != 0;
  size_t in_len = 0;
  while (wants_stdin) {
    ssize_t n = read(0, stdin_buf + in_len, sizeof(stdin_buf) - in_len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      /* The standalone plugin meets the error itself (code 5 with its text); a pipe fails on the first read. */
      close(s);
      return standalone(argc, argv, 0);
    }
    if (n == 0) break;
    in_len += (size_t)n;
    if (in_len > MAX_STDIN) {
      close(s);
      return standalone(argc, argv, in_len); /* reads past the cap, and refuses as it always did */
    }
  }

  unsigned char head[REQUEST_HEAD] = {'F', 'C', 'N', 'I', PROTOCOL, 0, 0, 0};
  put32(head + 8, env_count);
  put32(head + 12, (uint32_t)env_len);
  put32(head + 16, (uint32_t)in_len);
  unsigned char reply[REPLY_HEAD];
  if (set_timeout(s, SO_SNDTIMEO, REPLY_TIMEOUT_S) < 0 || set_timeout(s, SO_RCVTIMEO, REPLY_TIMEOUT_S) < 0 ||
      send_request(s, head, env_len, in_len) < 0) {
    close(s);
    return standalone(argc, argv, in_len); /* the agent took no request */
  }
  if (read_full(s, reply, REPLY_HEAD) < 0) {
    int timed_out = errno == EAGAIN || errno == EWOULDBLOCK;
    close(s);
    /* Still running the call after the time bound: a second run beside it could race it on the same pod, so
     * the runtime gets an error (it then deletes and retries the pod). A closed connection is an agent that
     * went away (a restart): the call is run here instead; ADD and DEL may then run twice, which CNI's
     * delegates tolerate (DEL is idempotent; a repeated ADD fails cleanly and the runtime retries). */
    if (timed_out) return fail("flanneld did not answer the call in time", "it may still be running it");
    return standalone(argc, argv, in_len);
  }
  if (memcmp(reply, "FCNR", 4) != 0 || reply[4] != PROTOCOL || reply[5] != 0) {
    /* It refused the request (reply[5] 1) or is not flanneld: nothing was run or written yet. */
    close(s);
    return standalone(argc, argv, in_len);
  }
  int rc = reply[6];
  uint32_t out_len = get32(reply + 8), err_len = get32(reply + 12);
  if (out_len > MAX_REPLY || err_len > MAX_REPLY - out_len) {
    close(s);
    return fail("flanneld's reply is over the protocol's size", "");
  }
  size_t total = (size_t)out_len + err_len;
  unsigned char *body = NULL;
  if (total > 0) {
    body = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (body == MAP_FAILED) {
      close(s);
      return fail("no memory for flanneld's reply", strerror(errno));
    }
    if (read_full(s, body, total) < 0) {
      close(s);
      /* The call ran in the agent (this is its result being sent): running it again would do it twice. */
      return fail("flanneld went away while sending the call's result", "the call ran; its result is lost");
    }
  }
  close(s);

  /* A reader that went away is an exit status, as for the Python plugin (which ignores SIGPIPE), not a signal. */
  if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) return fail("cannot ignore SIGPIPE", strerror(errno));
  if (err_len > 0 && write_all(2, body + out_len, err_len) < 0) rc = rc ? rc : 1;
  if (out_len > 0 && write_all(1, body, out_len) < 0) rc = rc ? rc : 1;
  return rc;
}
