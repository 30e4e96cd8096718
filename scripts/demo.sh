#!/usr/bin/env bash
# Set-up and demo in one command: Debian packages, a Release build, then `mmbridge demo`, which
# writes a random-weight LLaVA-1.5-7B-sized projector checkpoint plus one image's hidden states
# and runs `info` and `connect` on them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
./build/mmbridge demo "${1:-build/demo}"
