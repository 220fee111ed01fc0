"""Static report of the hand-written CUDA kernels, read from what nvcc produced (no GPU needed).

For every kernel in csrc/SOURCES, per architecture: registers, stack (spills), static shared memory
(`cuobjdump --dump-resource-usage`; "+ dynamic" where the kernel's ring is dynamic shared memory, sized at
launch), and for the tensor-core kernels the SASS instructions per MMA in the
main loop: the instructions of the innermost loop (backward branch) holding the most HMMAs, divided by
its HMMA count -- issue, barriers, address arithmetic and the BN transform included. "loop": the
instructions of that loop, or for a kernel without HMMA its largest innermost loop (for the elementwise
kernels, the per-element cost times the compiler's unrolling).
cuobjdump comes from Triton's wheel when the CUDA toolkit lacks it (ENVIRONMENT.md).

    python benchmarks/cuda_static_report.py [--arch 80 90] [--check] [--markdown] [--loops] [--objects BUILD]

--loops adds, per kernel, the sizes of all its innermost loops in address order (main loop, epilogue and
statistics loops: what one thread executes per iteration of each).

--objects BUILD reads the kernels from a CMake build's object files (`cuobjdump -arch sm_XX` on
BUILD/**/<source>.o; CMakeLists.txt compiles for sm_80 and sm_90) instead of compiling each source again:
.ci/check_cuda.sh shares its CMake build with the report this way. The device code is the same: CMake adds
-O3 (host code) and -lineinfo (no effect on SASS) to the same nvcc, standard and includes.

--check exits 1 on any spill. Figures before/after a change go into benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    raise SystemExit(f"cuda_static_report: {name} not found (CUDA toolkit or Triton's wheel)")


def _sources():
    lines = (CSRC / "SOURCES").read_text().splitlines()
    return [CSRC / l.strip() for l in lines if l.strip() and not l.startswith("#")]


def _demangle_short(name):
    """kernel name and template arguments from a mangled symbol, enough to tell launches apart."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    out = re.sub(r"fused_resnet::detail::\(anonymous namespace\)::", "", out)
    out = out.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return re.sub(r"\(.*\)$", "", out)


def _innermost_loops(ins):
    """[(first, last) address] of the loops (backward branches) holding no other loop, in address order."""
    loops = []
    for addr, text in ins:
        br = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if br and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))
    return sorted((lo, hi) for lo, hi in loops
                  if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2 in loops))


def _listing(block):
    """[(address, instruction text)] of one function's SASS."""
    ins = []
    for line in block.split("\n"):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    return ins


def loop_sizes(sass_text):
    """{mangled kernel: [instructions of each innermost loop, in address order]}."""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass_text)[1:]:
        ins = _listing(block)
        out[block.split("\n", 1)[0].strip()] = [sum(lo <= a <= hi for a, _ in ins) for lo, hi in _innermost_loops(ins)]
    return out


def _sass_per_mma(sass_text):
    """{mangled kernel: (HMMA in the main loop, instructions in that loop)}. The main loop: the innermost
    backward branch's range that holds the most HMMAs; without one (a fully unrolled burst), the span
    from the first to the last HMMA. A kernel without HMMA: (0, instructions of its largest innermost
    loop), (0, 0) without a loop."""
    result = {}
    for block in re.split(r"\n\s*Function : ", sass_text)[1:]:
        name = block.split("\n", 1)[0].strip()
        ins = _listing(block)
        hmma = [a for a, text in ins if re.search(r"\bHMMA\b", text)]
        if not hmma:
            sizes = [sum(lo <= a <= hi for a, _ in ins) for lo, hi in _innermost_loops(ins)]
            result[name] = (0, max(sizes, default=0))
            continue
        best = None
        for addr, text in ins:
            br = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
            if not br or int(br.group(1), 16) >= addr:
                continue
            lo, hi = int(br.group(1), 16), addr
            n = sum(lo <= a <= hi for a in hmma)
            size = sum(lo <= a <= hi for a, _ in ins)
            if n and (best is None or n > best[0] or (n == best[0] and size < best[1])):
                best = (n, size)
        if best is None:
            best = (len(hmma), sum(hmma[0] <= a <= hmma[-1] for a, _ in ins))
        result[name] = best
    return result


def _object_for(objects: Path, src: Path) -> Path:
    """The CMake object file of a source under a build folder (BUILD/CMakeFiles/<target>.dir/csrc/.../x.cu.o)."""
    rel = src.relative_to(ROOT).as_posix() + ".o"
    found = [p for p in Path(objects).rglob(src.name + ".o") if p.as_posix().endswith(rel)]
    if len(found) != 1:
        raise SystemExit(f"cuda_static_report: {len(found)} object files for {rel} under {objects} (expected 1: "
                         f"build with CMakeLists.txt first)")
    return found[0]


def report(archs, objects=None):
    cuobjdump = _tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for src in _sources():
                if objects is not None:
                    cubin = _object_for(objects, src)
                    pick = ["-arch", f"sm_{arch}"]
                else:
                    cubin = Path(tmp) / f"{src.stem}.sm{arch}.cubin"
                    pick = []
                    cmd = ["nvcc", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-I", str(CSRC / "kernels"), "-I",
                           str(CSRC / "include"), "-o", str(cubin), str(src)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"nvcc failed on {src.name}:\n{out.stderr[-3000:]}")
                usage = subprocess.run([cuobjdump, *pick, "--dump-resource-usage", str(cubin)], capture_output=True,
                                       text=True).stdout
                listing = subprocess.run([cuobjdump, *pick, "-sass", str(cubin)], capture_output=True, text=True).stdout
                if objects is not None and "Function" not in usage:
                    raise SystemExit(f"cuda_static_report: no sm_{arch} code in {cubin}")
                sass, loops = _sass_per_mma(listing), loop_sizes(listing)
                current = None
                for line in usage.splitlines():
                    fn = re.search(r"Function (\S+):", line)
                    if fn:
                        current = fn.group(1)
                        continue
                    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)
                    if res and current:
                        mma, span = sass.get(current, (0, 0))
                        rows.append(dict(arch=arch, file=src.name, kernel=_demangle_short(current),
                                         regs=int(res.group(1)), stack=int(res.group(2)),
                                         shared=int(res.group(3)), mma=mma, loop=span,
                                         loops=loops.get(current, []),
                                         per_mma=(span / mma) if mma else None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90"])
    ap.add_argument("--check", action="store_true", help="exit 1 on any spill (stack > 0)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--loops", action="store_true", help="also every innermost loop's size, in address order")
    ap.add_argument("--objects", metavar="BUILD", help="read a CMake build's object files instead of compiling")
    args = ap.parse_args(argv)
    rows = report(args.arch, args.objects)
    sep = " | " if args.markdown else "  "
    head = ["arch", "kernel", "regs", "stack", "shared B", "loop", "HMMA", "SASS/HMMA"] + (["loops"] if args.loops else [])
    lines = [sep.join(head)]
    if args.markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        # a tensor-core kernel with no static shared memory past the 1 KB sm_90 reserves takes its ring as
        # dynamic shared memory (block_shared past 48 KB), whose size the cubin does not record
        shared = f"{r['shared']} + dynamic" if r["mma"] and r["shared"] <= 1024 else str(r["shared"])
        cells = [f"sm_{r['arch']}", r["kernel"], str(r["regs"]), str(r["stack"]), shared, str(r["loop"]),
                 str(r["mma"]),
                 f"{r['per_mma']:.1f}" if r["per_mma"] else "-"]
        if args.loops:
            cells.append(" ".join(map(str, r["loops"])))
        lines.append(("| " + " | ".join(cells) + " |") if args.markdown else sep.join(cells))
    print("\n".join(lines))
    spills = [r for r in rows if r["stack"] > 0]
    if args.check and spills:
        print(f"cuda_static_report: {len(spills)} kernels spill", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
