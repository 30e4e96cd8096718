#!/usr/bin/env bash
# Every test: the header as C11 and C++, the C unit tests under ASan+UBSan, the oracle tests
# (pytest + transformers) against the sanitized CLI, the Python package (sanitized, Release, and as pip
# installs it), the fuzzers for a bounded number of runs,
# and a smoke run of the benchmarks. Python packages come from tests/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian 12's own python3 marks itself externally managed; the test oracles install beside it.
export PIP_BREAK_SYSTEM_PACKAGES=1
jobs=$(nproc)

python3 -c "import torch, transformers, safetensors, pytest, numpy, PIL, scikit_build_core, mypy" 2>/dev/null ||
  python3 -m pip install -q -r tests/requirements.txt

echo "== the include graph follows the layer order"
python3 scripts/check_layers.py

echo "== public header compiles as C11 and C++ (pedantic)"
cc -std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only -x c include/mmbridge.h
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -fsyntax-only -x c++ include/mmbridge.h

echo "== ASan+UBSan build and C unit tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMMB_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs" >/dev/null
export ASAN_OPTIONS=detect_leaks=1:exitcode=99 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=99
ctest --test-dir build-asan --output-on-failure

echo "== exported symbols carry the mmb_ prefix"
bad=$(nm -g --defined-only build-asan/libmmbridge.so | awk '$2 ~ /[TDRB]/ {print $3}' | grep -v '^mmb_' | grep -v '^_' || true)
[ -z "$bad" ] || { echo "unprefixed exports: $bad"; exit 1; }

echo "== oracle tests against transformers (sanitized CLI)"
MMB_BIN="$PWD/build-asan/mmbridge" python3 -m pytest tests/oracle -q -rA -p no:cacheprovider | tail -n 60

echo "== the Python package against the ASan+UBSan library (libasan preloaded into python; leaks: the C tests')"
LD_PRELOAD="$(cc -print-file-name=libasan.so) $(cc -print-file-name=libubsan.so)" ASAN_OPTIONS=detect_leaks=0:exitcode=99 \
  MMB_BIN="$PWD/build-asan/mmbridge" python3 -m pytest tests/python -q -p no:cacheprovider | tail -n 3

echo "== ThreadSanitizer: the pool's jobs and the decoder's barriers (C tests and the CLI on the threaded paths)"
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMMB_TSAN=ON -DMMB_BUILD_BENCH=OFF >/dev/null
cmake --build build-tsan -j"$jobs" >/dev/null
TSAN_OPTIONS=halt_on_error=1:exitcode=66 ctest --test-dir build-tsan -R 'test_(api|attention|lm|mllm)$' --output-on-failure
TSAN_OPTIONS=halt_on_error=1:exitcode=66 MMB_BIN="$PWD/build-tsan/mmbridge" python3 -m pytest -q -p no:cacheprovider \
  tests/oracle/test_decoder.py tests/oracle/test_llama_adapter.py tests/oracle/test_fusion_a.py \
  tests/oracle/test_cogvlm.py tests/oracle/test_mplug_owl2.py | tail -n 3
TSAN_OPTIONS=halt_on_error=1:exitcode=66 MMB_BIN="$PWD/build-tsan/mmbridge" python3 -m pytest -q -p no:cacheprovider \
  tests/oracle/test_serve.py -k "load or queue or sigterm or chat_streamed" | tail -n 3

echo "== fuzzers (bounded)"
bash fuzz/run.sh build-fuzz

echo "== Release build, make install, and a program built against the installed pkg-config file"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs" >/dev/null
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install build --prefix "$prefix" >/dev/null
libdir=$(ls -d "$prefix"/lib*)
cc -std=c11 -Wall -Wextra -Werror tests/test_api.c -o "$prefix/api_installed" \
  $(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags --libs mmbridge) -lm
(cd "$prefix" && LD_LIBRARY_PATH="$libdir" ./api_installed)
"$prefix/bin/mmbridge" --version

echo "== the Python package's type hints (mypy --strict)"
python3 -m mypy --strict --no-error-summary --cache-dir=/dev/null python/mmbridge
echo "== the Python package (tests/python) against the Release build"
MMB_BIN="$PWD/build/mmbridge" python3 -m pytest tests/python -q -p no:cacheprovider | tail -n 3
echo "== pip install . (scikit-build-core builds libmmbridge.so into the package), then its tests on that install"
python3 -m pip install -q --root-user-action=ignore --no-build-isolation --no-deps --target "$prefix/py" .
test -f "$prefix/py/mmbridge/libmmbridge.so" -a -f "$prefix/py/mmbridge/py.typed"
(cd "$prefix" && env -u MMBRIDGE_LIB PYTHONPATH="$prefix/py" python3 -c \
  'import mmbridge, sys; assert mmbridge.library_path().startswith(sys.argv[1]), mmbridge.library_path(); print("mmbridge", mmbridge.version(), mmbridge.library_path())' "$prefix/py")
env -u MMBRIDGE_LIB MMB_PY_INSTALLED=1 PYTHONPATH="$prefix/py" MMB_BIN="$PWD/build/mmbridge" \
  python3 -m pytest tests/python -q -p no:cacheprovider | tail -n 3

echo "== memory (Release: ASan replaces malloc): peak RSS bound, no allocation in a warm forward"
(cd build && ./test_memory)
MMB_BIN="$PWD/build/mmbridge" python3 -m pytest tests/oracle/test_memory.py -q -p no:cacheprovider
echo "== hostile inputs under an address-space cap (Release: the sanitizers' shadow memory allows none)"
MMB_BIN="$PWD/build/mmbridge" python3 -m pytest -q -p no:cacheprovider tests/oracle/test_hostile_templates.py \
  tests/oracle/test_hostile_inputs.py tests/oracle/test_hostile_outputs.py | tail -n 3

echo "== benchmark smoke (Release)"
./build/bench_gemm --quick
./build/bench_projector --quick
./build/bench_vit --quick --dir build/bench-cache
./build/bench_dense --quick --dir build/bench-cache
./build/bench_decoder --quick --dir build/bench-cache
python3 bench/results.py --quick --out build/RESULTS-quick.md
python3 bench/bench_fusion_a.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_mllama.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_train.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_cogvlm.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_vq.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_server.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
python3 bench/bench_extract.py --quick --dir build/bench-cache --append build/RESULTS-quick.md >/dev/null
echo "all tests passed"
