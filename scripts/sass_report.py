"""Registers, spills and the SASS instructions per element of every CUDA kernel instantiation of
dqa_ext, from the compiled code alone (no GPU): compiles csrc/cuda/*.cu with nvcc for each arch
(torch's nvcc flags, as scripts/check_cuda_kernels.sh), disassembles them with nvdisasm and, for
each kernel that walks elements, finds its main loop (the pair loop of dqa_walk.h: two vectors
per iteration) and counts its instructions.

    python scripts/sass_report.py [--arch sm_90 ...] [--out FILE] [--check]

Per element = hot instructions of one iteration of the main loop / the elements it stores
(two vectors of VEC, or more where ptxas unrolled the loop). Hot: every instruction between the loop's head and its back-edge branch, except the
blocks that a branch skips to call the division's slow path (nvcc's IEEE division calls a
subroutine only when FCHK finds an operand out of range: denormals, infinities, huge ratios).
--check fails (exit 1) on a spill, on a budgeted kernel whose main loop is not found, on one
over its budget (BUDGETS), on a backward whose counter arrivals are not fenced atomicIncs
(ARRIVING), or on a kernel whose own code flushes subnormals (.FTZ) or whose fallback division is
not the IEEE one (DIVIDING: fast math injected by NVCC_APPEND_FLAGS does both). docs/cuda.md says
how to read the report.

Registers, stack and shared memory come from the cubin (cuobjdump -res-usage), spill bytes from
ptxas -v. Tools: nvcc from CUDA_HOME or PATH; cuobjdump and nvdisasm from this Python's
site-packages (the PyPI wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm install them as
nvidia/cu13/bin/, CUDA 12's as nvidia/cuda_*/bin/), CUDA_HOME or PATH. Exit status 2 when one
is missing.
"""

import argparse
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
WALK = CUDA_DIR / "dqa_walk.h"
MARK = "sass: main loop"  # the comment on the pair loops' lines in dqa_walk.h

# Torch's nvcc flags when torch is not importable (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]

# Instructions per element at most, for the forward (and grad_x alone) on both paths and the
# row backward, in every dtype, by vector width: 25 for 16-byte vectors (every aligned tensor
# whose rows are a multiple of 16 bytes: the shapes the targets are set on); narrower vectors
# (odd row lengths, misaligned pointers) carry the per-vector costs over fewer elements and get
# looser limits that catch regressions. Other kernels, and the backward's variants with scalar
# loads for misaligned pointers, are reported only.
BUDGETED = ("rows_kernel", "tiles_kernel", "grad_rows_kernel")
BUDGET_WIDEST = 25  # VEC * element size == 16 bytes
BUDGET_NARROWER = {4: 30, 2: 40, 1: 50}  # by VEC (elements per vector)
# Registers at most: the tiled backward keeps 5 blocks of 256 threads per SM (65536 / 1280).
REGISTER_LIMITS = {"grad_tiles_kernel": 48}

DTYPES = {"f": "f32", "6__half": "f16", "13__nv_bfloat16": "bf16"}
KERNEL = re.compile(r"\d(?P<name>[a-z_]+_kernel)I(?P<t>f|6__half|13__nv_bfloat16)Li(?P<vec>\d+)ELb(?P<flag>[01])E")
INSTR = re.compile(r"^\s+/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P\w+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<rest>[^;]*);")
LABEL = re.compile(r"^(?P<label>\.L_x_\d+):")
SUBROUTINE = re.compile(r"^(?P<name>\$\S+):$")  # NVIDIA's subroutines (division, rcp slow paths)
LINE = re.compile(r'^\s*//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
FUNC = re.compile(r"^\s*\.text\.(?P<name>\S+):$")
TARGET = re.compile(r"`\((?P<label>\.L_x_\d+)\)")


def find_tool(name):
    """A CUDA tool from this Python's site-packages (nvidia/*/bin), CUDA_HOME, or PATH."""
    roots = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages(),
                                                          sysconfig.get_paths()["purelib"]] + sys.path))
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "*", "bin", name))):
            if os.access(path, os.X_OK):
                return path
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(cuda_home, "bin", name)
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def nvcc_flags():
    try:
        import torch.utils.cpp_extension as ext

        flags = list(ext.COMMON_NVCC_FLAGS)
    except Exception:  # noqa: BLE001 (no torch, or a torch without CUDA support: same flags)
        flags = list(TORCH_NVCC_FLAGS)
    return flags + ["-std=c++17", "-O3", "-lineinfo", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]


def compile_unit(nvcc, cuobjdump, src, arch, out_dir):
    """src compiled whole (host code included: the launchers must compile too) for one arch; its
    cubin extracted with cuobjdump. Returns the cubin and ptxas's log."""
    work = Path(out_dir) / f"{src.stem}.{arch}"
    work.mkdir()
    obj = work / f"{src.stem}.o"
    cmd = [nvcc, *nvcc_flags(), "-Xcompiler", "-fPIC", "-c", f"-arch={arch}", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: nvcc failed on {src.name} for {arch}:\n{r.stderr[-4000:]}")
    x = subprocess.run([cuobjdump, "-xelf", "all", str(obj)], cwd=work, capture_output=True, text=True)
    cubins = sorted(work.glob(f"*{arch}*.cubin"))
    if x.returncode != 0 or len(cubins) != 1:
        raise SystemExit(f"sass_report: no single {arch} cubin in {obj}: {x.stderr[-2000:]}")
    return cubins[0], r.stderr


def ptxas_resources(log):
    """mangled name -> (registers, spill store bytes, spill load bytes, stack frame bytes)."""
    res, name, spill = {}, None, (0, 0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(2)), int(m.group(3)), int(m.group(1)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            res[name] = (int(m.group(1)), *spill)
            name, spill = None, (0, 0, 0)
    return res


def resource_usage(cuobjdump, cubin):
    """mangled name -> (registers, stack bytes, local bytes, shared bytes), from the cubin."""
    r = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump failed on {cubin}:\n{r.stderr[-2000:]}")
    out, name = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = (int(m.group(1)), int(m.group(2)), int(m.group(4)), int(m.group(3)))
            name = None
    return out


def disassemble(nvdisasm, cubin):
    """mangled name -> list of instructions {addr, pred, op, rest, file, line, sub}, and labels;
    sub names the NVIDIA subroutine an instruction belongs to (None: the kernel's own code)."""
    r = subprocess.run([nvdisasm, "-c", "-g", str(cubin)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: nvdisasm failed on {cubin}:\n{r.stderr[-2000:]}")
    funcs, cur, src = {}, None, (None, None)
    for line in r.stdout.splitlines():
        m = FUNC.match(line)
        if m:
            cur = {"instrs": [], "labels": {}, "pending": [], "sub": None}
            funcs[m.group("name")] = cur
            src = (None, None)
            continue
        if cur is None:
            continue
        m = SUBROUTINE.match(line)
        if m:
            cur["sub"] = m.group("name")
            continue
        m = LINE.match(line)
        if m:
            src = (m.group("file"), int(m.group("line")))
            continue
        m = LABEL.match(line)
        if m:
            cur["pending"].append(m.group("label"))
            continue
        m = INSTR.match(line)
        if m:
            ins = {"addr": int(m.group("addr"), 16), "pred": (m.group("pred") or "").strip(),
                   "op": m.group("op"), "rest": m.group("rest").strip(), "file": src[0], "line": src[1],
                   "sub": cur["sub"]}
            for label in cur["pending"]:
                cur["labels"][label] = ins["addr"]
            cur["pending"] = []
            cur["instrs"].append(ins)
    return funcs


def marked_lines():
    """dqa_walk.h's line numbers that carry the main-loop mark."""
    if not WALK.exists():
        return set()
    return {i + 1 for i, text in enumerate(WALK.read_text().splitlines()) if MARK in text}


def loops(func):
    """(head, back-edge) address pairs of the function's backward branches."""
    out = []
    for ins in func["instrs"]:
        if ins["op"].startswith("BRA"):
            m = TARGET.search(ins["rest"])
            if m and m.group("label") in func["labels"]:
                target = func["labels"][m.group("label")]
                if target <= ins["addr"]:
                    out.append((target, ins["addr"]))
    return out


def main_loop(func, marks):
    """The innermost loop holding an instruction of a marked line of dqa_walk.h; without marks
    (an older tree), the innermost loop with the most global loads."""
    found = loops(func)
    inner = [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]

    def within(a, b):
        return [i for i in func["instrs"] if a <= i["addr"] <= b]

    if marks:
        hits = [(a, b) for a, b in inner
                if any(i["file"] and i["file"].endswith("dqa_walk.h") and i["line"] in marks
                       for i in within(a, b))]
        return min(hits, key=lambda ab: ab[1] - ab[0]) if hits else None
    if not inner:
        return None
    return max(inner, key=lambda ab: (sum(i["op"].startswith("LDG") for i in within(*ab)), -(ab[1] - ab[0])))


STORE_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def stored_elements(instrs, elem_bytes):
    """Elements one pass over instrs stores: every kernel here writes one output per element."""
    total = 0
    for ins in instrs:
        if ins["op"].startswith("STG"):
            widths = [STORE_BYTES[p] for p in ins["op"].split(".")[1:] if p in STORE_BYTES]
            total += widths[0] if widths else 4
    return total // elem_bytes


def hot_instructions(func, head, tail):
    """Instructions of [head, tail] less the blocks skipped around a CALL (the slow path)."""
    body = [i for i in func["instrs"] if head <= i["addr"] <= tail]
    cold = set()
    for ins in body:
        if ins["op"].startswith("BRA") and ins["pred"]:
            m = TARGET.search(ins["rest"])
            target = func["labels"].get(m.group("label")) if m else None
            if target is None or not (ins["addr"] < target <= tail):
                continue
            skipped = [i for i in body if ins["addr"] < i["addr"] < target]
            if any(i["op"].startswith("CALL") for i in skipped):
                cold.update(i["addr"] for i in skipped)
    hot = [i for i in body if i["addr"] not in cold and i["op"] != "NOP"]
    return hot, len(body)


def analyse(arch, units, nvcc, nvdisasm, cuobjdump, tmp):
    marks = marked_lines()
    rows = []
    for src in units:
        cubin, log = compile_unit(nvcc, cuobjdump, src, arch, tmp)
        res = ptxas_resources(log)
        usage = resource_usage(cuobjdump, cubin)
        funcs = disassemble(nvdisasm, cubin)
        for name in sorted(set(res) | set(funcs)):
            m = KERNEL.search(name)
            plain = re.search(r"\d([a-z_]+_kernel)", name)
            kernel = m.group("name") if m else (plain.group(1) if plain else name)
            row = {"arch": arch, "unit": src.name, "mangled": name, "kernel": kernel,
                   "dtype": DTYPES[m.group("t")] if m else "-", "vec": int(m.group("vec")) if m else 0,
                   "flag": int(m.group("flag")) if m else None}
            _, st, ld, frame = res.get(name, (None, 0, 0, 0))
            regs, stack, local, shared = usage.get(name, (None, 0, 0, 0))
            row.update(regs=regs, spill_stores=st, spill_loads=ld, stack=max(frame, stack), local=local,
                       shared=shared)
            func = funcs.get(name)
            row["order"] = arrival_problems(func) if func and kernel in ARRIVING else []
            row["arith"] = arithmetic_problems(func) if func and kernel in DIVIDING else []
            loop = main_loop(func, marks) if func and m else None
            if loop:
                hot, static = hot_instructions(func, *loop)
                per_iter = stored_elements(hot, 4 if row["dtype"] == "f32" else 2)
                if per_iter:
                    row.update(loop_static=static, loop_hot=len(hot), per_iter=per_iter,
                               per_element=len(hot) / per_iter)
            rows.append(row)
    return rows


# The fused finalize's arrivals (dqa_backward.cu's KernelFinalize::arrive), in the kernels that
# have one: each atomic is atomicInc (it wraps the counter back to zero: no reset store), after a
# fence with no barrier between them (release) and followed by a fence before the next barrier
# (acquire).
ARRIVING = ("grad_rows_kernel", "grad_tiles_kernel")


def arrival_problems(func):
    """What is wrong with the function's arrivals at the counters ([] when nothing)."""
    instrs = func["instrs"]
    atomics = [k for k, i in enumerate(instrs) if i["op"].startswith(("ATOM", "RED"))]
    if not atomics:
        return ["no arrival at a counter (atomicInc) found"]
    bad = []
    for k in atomics:
        op = instrs[k]["op"]
        if ".INC" not in op:
            bad.append(f"arrival by {op}, not atomicInc")
        before = next((i["op"] for i in reversed(instrs[:k]) if i["op"].startswith(("MEMBAR", "BAR"))), "")
        after = next((i["op"] for i in instrs[k + 1:] if i["op"].startswith(("MEMBAR", "BAR"))), "")
        if not before.startswith("MEMBAR"):
            bad.append(f"{op} at {instrs[k]['addr']:#x} without a fence after the barrier (release)")
        if not after.startswith("MEMBAR"):
            bad.append(f"{op} at {instrs[k]['addr']:#x} without a fence before the barrier (acquire)")
    return bad


# Kernels that divide: bitwise parity needs IEEE float arithmetic in their own code (no .FTZ op:
# a --use_fast_math or -ftz=true injected by NVCC_APPEND_FLAGS flushes subnormals) and the IEEE
# division as the fast division's fallback (FCHK, its range check; fast math makes x / s an
# approximate reciprocal and product without one). NVIDIA's subroutines may use .FTZ inside.
DIVIDING = ("rows_kernel", "tiles_kernel", "grad_rows_kernel", "grad_tiles_kernel")


# __frcp_rn's inline part negates its error term with FADD.FTZ Rd, -Ra, -RZ two instructions
# after MUFU.RCP (NVIDIA's IEEE reciprocal, left to it).
RCP_NEGATION = re.compile(r"^R\d+, -R\d+, -RZ$")


def arithmetic_problems(func):
    """What in the function's own code breaks IEEE parity ([] when nothing)."""
    own = [i for i in func["instrs"] if i["sub"] is None]

    def rcp_negation(k):
        i = own[k]
        return (i["op"] == "FADD.FTZ" and RCP_NEGATION.match(i["rest"])
                and any(j["op"] == "MUFU.RCP" for j in own[max(0, k - 3):k]))

    bad = [f"{i['op']} at {i['addr']:#x} flushes subnormals" for k, i in enumerate(own)
           if ".FTZ" in i["op"] and not rcp_negation(k)][:3]
    if not any(i["op"] == "FCHK" for i in own):
        bad.append("no FCHK: the fallback division is not the IEEE one")
    return bad


def variant(row):
    k, f = row["kernel"], row["flag"]
    if k in ("rows_kernel", "tiles_kernel", "elementwise_kernel"):
        return "grad_x" if f else "forward"
    if k.startswith("grad_"):
        return "packed" if f else "scalar loads"
    return "-"


def budget(row):
    if row["kernel"] not in BUDGETED or (row["kernel"].startswith("grad_") and not row["flag"]):
        return None
    if row["vec"] * (4 if row["dtype"] == "f32" else 2) == 16:
        return BUDGET_WIDEST
    return BUDGET_NARROWER.get(row["vec"])


def render(rows):
    out = ["| arch | kernel | variant | dtype | VEC | regs | spills st/ld, stack (B) | smem (B) "
           "| loop instr. hot/all | elements/iter. | **instr./element** | budget |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = budget(r)
        per = r.get("per_element")
        per_s = f"**{per:.2f}**" if per is not None else "-"
        loop = f"{r['loop_hot']}/{r['loop_static']}" if per is not None else "-"
        status = "-" if b is None else (f"{b}" + ("" if per is None or per <= b else " OVER"))
        limit = REGISTER_LIMITS.get(r["kernel"])
        regs = f"{r['regs']}" + (f" (<= {limit})" if limit else "")
        out.append(f"| {r['arch']} | {r['kernel']} | {variant(r)} | {r['dtype']} | {r['vec'] or '-'} | "
                   f"{regs} | {r['spill_stores']}/{r['spill_loads']}, {r['stack']} | {r['shared']} | {loop} | "
                   f"{r.get('per_iter', '-')} | {per_s} | {status} |")
    return "\n".join(out)


def problems(rows):
    bad = []
    for r in rows:
        name = f"{r['arch']} {r['kernel']}<{r['dtype']}, {r['vec']}, {r['flag']}>"
        # A stack frame alone is the IEEE division's slow-path subroutine saving registers when
        # it is called (operands out of the fast range): reported, not a spill.
        if r["spill_stores"] or r["spill_loads"] or r["local"]:
            bad.append(f"{name}: spills {r['spill_stores']}/{r['spill_loads']} bytes, local {r['local']}")
        bad.extend(f"{name}: {p}" for p in r.get("order", []) + r.get("arith", []))
        limit = REGISTER_LIMITS.get(r["kernel"])
        if limit and (r["regs"] is None or r["regs"] > limit):
            bad.append(f"{name}: {r['regs']} registers > {limit}")
        b = budget(r)
        if b is not None:
            if r.get("per_element") is None:
                bad.append(f"{name}: main loop not found")
            elif r["per_element"] > b:
                bad.append(f"{name}: {r['per_element']:.2f} instructions per element > {b}")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="sm_XX (repeatable; default sm_80 and sm_90)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--check", action="store_true", help="exit 1 on a spill or a budget exceeded")
    ap.add_argument("--nvcc", help="nvcc to use (default: CUDA_HOME/bin/nvcc, else PATH)")
    args = ap.parse_args()
    archs = args.arch or ["sm_80", "sm_90"]
    nvcc = args.nvcc or find_tool("nvcc")
    nvdisasm = find_tool("nvdisasm")
    cuobjdump = find_tool("cuobjdump")
    missing = [n for n, p in (("nvcc", nvcc), ("nvdisasm", nvdisasm), ("cuobjdump", cuobjdump)) if not p]
    if missing:
        print(f"sass_report: {', '.join(missing)} not found (pip install nvidia-cuda-nvdisasm "
              "nvidia-cuda-cuobjdump; nvcc from a CUDA toolkit)", file=sys.stderr)
        return 2
    units = sorted(CUDA_DIR.glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for arch in archs for r in analyse(arch, units, nvcc, nvdisasm, cuobjdump, tmp)]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    dis = subprocess.run([nvdisasm, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    bad = problems(rows)
    report = "\n".join([
        "# SASS report of the CUDA kernels",
        "",
        "Written by `python scripts/sass_report.py --out <this file>`; `docs/cuda.md` says how to "
        "read it.",
        f"nvcc: {version}; nvdisasm: {dis}.",
        "",
        render(rows),
        "",
        "Registers at most: " + ", ".join(f"{k} {v}" for k, v in REGISTER_LIMITS.items())
        + "; no kernel may spill (a stack frame without spills is the IEEE division's slow-path "
        "subroutine, which saves registers only when it is called).",
        "",
        "Budgets (instructions per element, hot path of the main loop) for "
        + ", ".join(BUDGETED) + " (packed variants): "
        + f"{BUDGET_WIDEST} with 16-byte vectors; narrower, by VEC: "
        + ", ".join(f"{v} elements: {b}" for v, b in BUDGET_NARROWER.items()) + ".",
        "",
        "Also checked: in " + ", ".join(ARRIVING) + " every arrival at a counter is an atomicInc "
        "between two fences (release after the barrier, acquire before the next); in "
        + ", ".join(DIVIDING) + " no .FTZ operation outside NVIDIA's subroutines (and __frcp_rn's "
        "negation) and an FCHK, the IEEE division's range check (fast math has neither).",
        "",
        "Result: " + ("within budget, no spills." if not bad else "FAILED: " + "; ".join(bad)),
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.check and bad:
        print("sass_report: FAILED\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
