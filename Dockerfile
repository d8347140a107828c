# pyflannel image: flanneld (Python 3.11) plus the host-installable `flannel` CNI plugin.
#
#   docker build -t pyflannel:0.1.0 .
#
# Stage 1 builds the CNI plugin with scripts/build-cni.sh: a standalone directory (a static C launcher, a copy of
# Debian's python3.11 and only the stdlib modules the plugin imports), because the plugin runs on the host,
# which may have no Python; it needs the host's glibc only (bookworm's 2.36 or newer). Stage 2 is the runtime:
# flanneld needs iptables/nftables (ip-masq, forward rules) and iproute2; the init containers run
# /usr/local/bin/install-cni.sh (scripts/install-cni.sh) to copy the plugin and the conflist to the host.

FROM debian:bookworm-slim AS cni-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 gcc libc6-dev patchelf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyflannel ./pyflannel
COPY scripts/build-cni.sh ./scripts/build-cni.sh
RUN OUT=/out scripts/build-cni.sh

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
COPY pyflannel ./pyflannel
# pip puts the `flanneld` entry point in /usr/local/bin.
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
COPY --from=cni-build /out/flannel.dist /opt/flannel/cni/flannel.dist
COPY scripts/install-cni.sh /usr/local/bin/install-cni.sh
COPY deploy/kube-flannel.yml /usr/share/pyflannel/kube-flannel.yml
RUN chmod 0755 /usr/local/bin/install-cni.sh \
 && flanneld --version
ENTRYPOINT ["/usr/local/bin/flanneld"]
