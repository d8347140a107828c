#!/bin/sh
# The kube-flannel init containers' install step: puts the flannel CNI plugin and the CNI config on the host.
#
#   install-cni.sh plugin   $ROOT/opt/flannel/cni/flannel.dist (scripts/build-cni.sh's standalone directory)
#                           -> $ROOT/opt/cni/bin/.flannel-<id>/, with $ROOT/opt/cni/bin/flannel a relative
#                           symlink to the binary in it (the directory carries its own Python runtime)
#   install-cni.sh conf     $ROOT/etc/kube-flannel/cni-conf.json -> $ROOT/etc/cni/net.d/10-flannel.conflist
#
# ROOT (env CNI_ROOT, default empty) lets the tests run the same commands against a temporary directory.
# Both steps replace the old files atomically (rename), so a container runtime calling the plugin while a
# new DaemonSet pod starts sees either the old or the new plugin, never a half-copied one.
set -eu

ROOT=${CNI_ROOT:-}
PLUGIN_SRC=${PLUGIN_SRC:-$ROOT/opt/flannel/cni/flannel.dist}
CONF_SRC=${CONF_SRC:-$ROOT/etc/kube-flannel/cni-conf.json}
BIN_DIR=$ROOT/opt/cni/bin
NET_DIR=$ROOT/etc/cni/net.d

install_plugin() {
  [ -x "$PLUGIN_SRC/flannel" ] || { echo "install-cni: no executable $PLUGIN_SRC/flannel" >&2; exit 1; }
  mkdir -p "$BIN_DIR"
  # The id is the content's checksum: reinstalling the same build changes nothing on the host.
  id=$(cd "$PLUGIN_SRC" && find . -type f | LC_ALL=C sort | xargs cksum | cksum | cut -d' ' -f1)
  dist=".flannel-$id"
  if [ ! -x "$BIN_DIR/$dist/flannel" ]; then
    rm -rf "$BIN_DIR/$dist.tmp"
    cp -a "$PLUGIN_SRC" "$BIN_DIR/$dist.tmp"
    mv "$BIN_DIR/$dist.tmp" "$BIN_DIR/$dist"
  fi
  ln -sfn "$dist/flannel" "$BIN_DIR/.flannel.new"
  mv -f -T "$BIN_DIR/.flannel.new" "$BIN_DIR/flannel"
  # Earlier builds: nothing points at them any more.
  for old in "$BIN_DIR"/.flannel-*; do
    [ -e "$old" ] || continue
    [ "$(basename "$old")" = "$dist" ] || rm -rf "$old"
  done
  echo "installed $BIN_DIR/flannel -> $dist/flannel"
}

install_conf() {
  [ -f "$CONF_SRC" ] || { echo "install-cni: no $CONF_SRC" >&2; exit 1; }
  mkdir -p "$NET_DIR"
  cp -f "$CONF_SRC" "$NET_DIR/.10-flannel.conflist.tmp"
  chmod 0644 "$NET_DIR/.10-flannel.conflist.tmp"
  mv -f "$NET_DIR/.10-flannel.conflist.tmp" "$NET_DIR/10-flannel.conflist"
  echo "installed $NET_DIR/10-flannel.conflist"
}

case "${1:-}" in
  plugin) install_plugin ;;
  conf) install_conf ;;
  *) echo "usage: install-cni.sh plugin|conf" >&2; exit 2 ;;
esac
