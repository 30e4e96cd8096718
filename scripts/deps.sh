#!/usr/bin/env bash
# Installs the Debian packages mmbridge builds, tests and benchmarks with (needs root or sudo).
set -euo pipefail
pkgs=(cmake make gcc g++ clang libclang-rt-14-dev pkg-config libcjson-dev libjpeg62-turbo-dev libpng-dev libwebp-dev libopenblas-dev libdnnl-dev libblis-dev
      libpcre2-dev libutf8proc-dev libmicrohttpd-dev libopenmpi-dev openmpi-bin chromium
      python3 python3-pip)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
