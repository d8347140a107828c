/*
 * The `flannel` executable of the host-installable CNI plugin (scripts/build-cni.sh builds it next to
 * python/ and main.py in flannel.dist/).
 *
 * The host may have no Python, and /opt/cni/bin/flannel is a symlink into the copied directory, so the
 * directory is found from /proc/self/exe (the resolved path), never from argv[0] or PATH. Then it replaces
 * itself with the bundled interpreter: -I keeps the runtime's PYTHON* variables and the cwd out, -S skips
 * site, -B never writes bytecode into the host's plugin directory (the build ships it). The environment
 * and the remaining arguments pass through untouched: CNI hands everything over in env and stdin.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PYTHON "/python/python3.11"
#define MAIN "/main.py"

/* A CNI error on stdout, as the runtime expects from any failing plugin (code 999: generic), in the plugin's
 * layout (libcni's types.Error.Print() plus cniVersion; no trailing newline). The texts are fixed ASCII or
 * strerror's: nothing to escape. */
static int fail(const char *msg, const char *detail) {
  printf("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 999,\n    \"msg\": \"flannel launcher: %s\"", msg);
  if (detail[0] != '\0') printf(",\n    \"details\": \"%s\"", detail);
  printf("\n}");
  return 1;
}

int main(int argc, char **argv) {
  char dir[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", dir, sizeof(dir) - 1);
  if (n <= 0) return fail("cannot read /proc/self/exe", strerror(errno));
  dir[n] = '\0';
  char *slash = strrchr(dir, '/');
  if (slash == NULL) return fail("unexpected /proc/self/exe", "no directory");
  *slash = '\0';

  char python[PATH_MAX], script[PATH_MAX];
  if ((size_t)snprintf(python, sizeof(python), "%s" PYTHON, dir) >= sizeof(python) ||
      (size_t)snprintf(script, sizeof(script), "%s" MAIN, dir) >= sizeof(script))
    return fail("path too long", "");

  /* python3.11 -I -S -B main.py ARGS...; argv[0] absolute: Python finds its prefix from it. */
  char **args = calloc((size_t)argc + 5, sizeof(char *));
  if (args == NULL) return fail("out of memory", "");
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
}
