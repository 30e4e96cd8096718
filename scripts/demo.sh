#!/usr/bin/env bash
# Set-up and demo in one command: Debian packages, a Release build, then `mmbridge demo`, which
# writes a random-weight LlavaForConditionalGeneration checkpoint (a small CLIP tower, a
# LLaVA-1.5-7B-sized projector, a one-layer LLM, a byte-level BPE tokenizer with a chat template)
# and runs info, encode and generate on data/sample.jpg through the library, streaming the text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
./build/mmbridge demo "${1:-build/demo}"
