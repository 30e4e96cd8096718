"""What the Python benchmarks share: the machine's probes (bench_gemm's FMA peak, bench_decoder's read bandwidth),
running a command, medians with their spread, markdown tables, the machine's description and a section of
bench/RESULTS.md written between markers."""
import os
import platform
import re
import shlex
import statistics
import subprocess
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def load_now():
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fma_probes(build, th):
    """bench_gemm's FMA peak probes on th threads: (fp32 flop/s, the better of its zmm and ymm loops; bf16 dpbf16
    flop/s, or None without avx512_bf16)."""
    cmd = [str(ROOT / build / "bench_gemm"), "--dtypes", "--quick", "--reps", "1", "--threads", str(th)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^\s+{th}\s+([\d.]+) GF/s\s+([\d.]+) GF/s(?:\s+([\d.]+) GF/s)?", out, re.M)
    return max(float(m.group(1)), float(m.group(2))) * 1e9, float(m.group(3)) * 1e9 if m.group(3) else None


def fma_peak(build, th):
    """bench_gemm's fp32 FMA peak probe (flop/s) on th threads."""
    return fma_probes(build, th)[0]


def kernel_isa():
    """The kernel mmbridge's CPU dispatch picks (base/cpu.c): AVX-512 with avx512f and avx512vl, else AVX2 + FMA."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "(unknown)"
    return "avx512f+avx512vl+fma" if {"avx512f", "avx512vl"} <= set(flags) else "avx2+fma"


def agree(x, y):
    """How many leading items x and y share."""
    n = 0
    for p, q in zip(x, y):
        if p != q:
            break
        n += 1
    return n


def bandwidth(build, th, quick=False):  # noqa: D401
    """bench_decoder's read-bandwidth probe (bytes/s) on th threads."""
    cmd = [str(ROOT / build / "bench_decoder"), "--bandwidth", "--threads", str(th)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"(\d+) thread\(s\): ([\d.]+) GB/s", out).group(2)) * 1e9


def run(cmd, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and p.returncode:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return p


def med(xs):
    return statistics.median(xs)


def spread(xs, fmt="{:.2f}"):
    m = med(xs)
    return fmt.format(m) + (f" ±{50 * (max(xs) - min(xs)) / m:.0f} %" if len(xs) > 1 and m else "")


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def machine_lines(build, peak, load0, bw=None, peak16=None):
    """The machine's description (results.py's), the probes of the run (peak16: the bf16 dpbf16 probe's, where
    there is one) and the load average."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import results
    m = dict(results.machine(SimpleNamespace(build=build)))
    m["Python peers"] = (f"torch {results.pyversion('torch')}, transformers {results.pyversion('transformers')} "
                         f"(Python {platform.python_version()})")
    keep = ["CPU", "ISA", "cores", "memory", "compiler", "Python peers", "date", "commit"]
    lines = [f"- **{k}**: {m[k]}" for k in keep if k in m]
    if peak:
        lines.insert(4, "- **fp32 FMA peak** (bench_gemm's probe, the best of the run): " + ", ".join(
            f"{t} thr {p * 1e-9:.1f} GFLOP/s" + (f" ({peak16[t] * 1e-9:.1f} bf16, dpbf16)" if peak16 and peak16.get(t)
                                                 else "") for t, p in sorted(peak.items())))
    if bw:
        lines.insert(5 if peak else 4, "- **read bandwidth** (bench_decoder --bandwidth, the best probe of the run): " +
                     ", ".join(f"{t} thr {b * 1e-9:.1f} GB/s" for t, b in sorted(bw.items())))
    lines.append(f"- **load average** (1, 5, 15 min) at the start: {load0}; at the end: {load_now()} (other work on "
                 f"the machine; {os.cpu_count()} CPUs)")
    return lines


def append(path, name, section):
    """Writes section between `<!-- name: begin/end -->` in path: in place of an earlier one, else at the end."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    p.write_text(new)
