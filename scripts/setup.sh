#!/usr/bin/env bash
# Installs what pyflannel needs on a Debian machine: the system packages and a venv in .venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(etcd-server etcd-client iproute2 iptables nftables iperf3 iputils-ping tcpdump curl
          containernetworking-plugins procps librsvg2-bin openssl  # openssl: throwaway CAs of the kube tests and the lab
          traceroute ipvsadm  # the lab: `exec POD -- traceroute`, `service add --mode ipvs` (ipvsadm -Ln)
          wireguard-go wireguard-tools  # the wireguard backend's userspace fallback; `wg` for tests and the lab
          strongswan-charon strongswan-swanctl libstrongswan-standard-plugins  # ipsec: charon, its VICI plugin, AES-GCM
          python3.11 gcc libc6-dev patchelf file strace  # scripts/build-cni.sh and its test
          qemu-system-x86 linux-image-amd64 busybox-static)  # the stock-kernel VM pass (virtme-ng needs busybox)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.pyflannel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
# The flannel CNI plugin runs once per pod and command: pip's wrapper is replaced by the static C client of
# flanneld's CNI server (no Python start while an agent serves; gcc, libc6-dev) and, as .venv/bin/flannel-py,
# the standalone plugin's launcher, which starts Python without site (about half the start-up time). Cheap,
# so done on every run (pip may rewrite it).
.venv/bin/python -m pyflannel.cni.launcher .venv/bin/flannel
# Bytecode, as the image's `pip install .` leaves it: an editable install writes none, and where
# PYTHONDONTWRITEBYTECODE is set (CI here) every agent, standalone plugin and lab start would otherwise compile
# pyflannel from source (~85 ms of an agent's start). A stale file is only ever recompiled in memory.
.venv/bin/python -m compileall -q -j0 pyflannel
