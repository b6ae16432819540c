#!/usr/bin/env bash
# GPU checks in one run: the CUDA tests, the Triton and compile tests on CUDA, and the CUDA step-time
# benchmark. Usage: scripts/gpu_check.sh OUTDIR   (from the repository root; PYTHON overrides python3)
# Every part runs under its own time limit and records its exit code in OUTDIR/summary.txt; nothing
# stops the script early. The limits add up to under seven minutes; on an H200, cold, runs took 2 to 2.5
# (before the head-to-head part was added).
set -u
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
failed=0

# The Triton kernel called directly, against a Triton kernel with the same memory traffic (the bound).
BENCH_PY="$(mktemp -d)/bench_kernel.py"
cat >"$BENCH_PY" <<'PYEOF'
import statistics, torch, triton, triton.language as tl
import adoptim

@triton.jit
def _bound(p, g, m, v, n, BLOCK: tl.constexpr):
    # The fused step's memory traffic with no arithmetic: read p, g, m, v; write p, m, v.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = offs < n
    a, b, c, d = tl.load(p + offs, mask=k), tl.load(g + offs, mask=k), tl.load(m + offs, mask=k), tl.load(v + offs, mask=k)
    tl.store(p + offs, a + b, mask=k)
    tl.store(m + offs, c + b, mask=k)
    tl.store(v + offs, d + b, mask=k)

def gpt2():
    s = [(50257, 768), (1024, 768)]
    for _ in range(12):
        s += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return s + [(768,), (768,)]

LAYOUTS = {"a: GPT-2 small": gpt2(), "b: 100 x 100k": [(100_000,)] * 100, "c: 1000 x 1000": [(1000,)] * 1000}

def timed(step, n=30):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n + 1)]
    ev[0][0].record(); step(); ev[0][1].record()
    for _ in range(3): step()
    for a, b in ev[1:]:
        a.record(); step(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev[1:]), ev[0][0].elapsed_time(ev[0][1])

GRAPHED = ("adoptim triton_adopt", "torch AdamW fused capturable")


class Functional:
    """The Triton kernel called directly, with the state an optimizer would keep."""
    def __init__(self, ps):
        from adoptim.kernels.contract import Hyper
        from adoptim.kernels.triton import triton_adopt
        self.kernel, self.ps = triton_adopt, ps
        self.hyper = Hyper(beta1=0.9, beta2=0.9999, lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False,
                           clip_exponent=0.25, eps=1e-6, maximize=False)
        self.m, self.v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        self.s = [torch.zeros((), device="cuda") for _ in ps]

    def step(self):
        self.kernel(self.ps, [p.grad for p in self.ps], self.m, self.v, self.s, self.hyper)

for name, shapes in LAYOUTS.items():
    numel = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    flat = [torch.randn(numel, device="cuda") for _ in range(4)]
    B = 4096
    rows.append(("bound (copy, same traffic)",) + timed(lambda: _bound[(triton.cdiv(numel, B),)](*flat, numel, BLOCK=B)))
    del flat
    makers = {
        "adoptim triton_adopt": Functional,
        "adoptim ADOPT fused": lambda ps: adoptim.ADOPT(ps, fused=True),
        "adoptim ADOPT fused flat": lambda ps: adoptim.ADOPT(ps, fused=True, flat=True),
        "adoptim ADOPT foreach": lambda ps: adoptim.ADOPT(ps, foreach=True),
        "adoptim ADOPT for-loop": lambda ps: adoptim.ADOPT(ps, foreach=False),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch AdamW fused capturable": lambda ps: torch.optim.AdamW(ps, fused=True, capturable=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    }
    for label, make in makers.items():
        ps = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        try:
            opt = make(ps)
        except (TypeError, ValueError) as e:
            print(f"{label}: skipped ({e})")
            continue
        rows.append((label,) + timed(opt.step, n=10 if "for-loop" in label else 30))
        if label in GRAPHED:  # the same step replayed from a CUDA graph: device time, no host work
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            rows.append((label + " (graph)",) + timed(graph.replay))
        del opt, ps
        torch.cuda.empty_cache()
    ref = dict((r[0], r[1]) for r in rows)
    bound, fused = ref["bound (copy, same traffic)"], ref.get("torch AdamW fused")
    print(f"\n{name}: {numel / 1e6:.1f}M float32 parameters in {len(shapes)} tensors, {torch.cuda.get_device_name()}")
    print(f"| {'row':36} | median ms | first ms | GB/s | of bound | vs AdamW fused |")
    print("|" + "-" * 38 + "|-----------|----------|------|----------|----------------|")
    for label, med, first in rows:
        gbs = 28 * numel / med / 1e6
        print(f"| {label:36} | {med:9.3f} | {first:8.1f} | {gbs:4.0f} | {bound / med:8.2f} | {med / fused if fused else float('nan'):14.2f} |")

# The launch configuration, swept on layout (a) (device time, CUDA-graph replay): the kernel's defaults
# are the best of these.
import adoptim.kernels.triton as K
defaults = (K._BLOCK, K._CHUNK, K._NUM_WARPS)
shapes = LAYOUTS["a: GPT-2 small"]
numel = sum(torch.Size(s).numel() for s in shapes)
print(f"\nlaunch configurations, layout a, CUDA-graph replay (defaults: block, chunk, warps = {defaults})")
print("| block | chunk | warps | median ms | GB/s |")
print("|------:|------:|------:|----------:|-----:|")
for block, chunk, warps in [(2048, 2048, 4), (2048, 2048, 8), (4096, 4096, 4), (4096, 4096, 8),
                            (8192, 8192, 8), (8192, 8192, 16), (2048, 16384, 4)]:
    K._BLOCK, K._CHUNK, K._NUM_WARPS = block, chunk, warps
    K._PLANS.clear()  # chunk lists depend on the chunk size
    ps = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = Functional(ps)
    for _ in range(3):
        opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    med, _ = timed(graph.replay)
    print(f"| {block} | {chunk} | {warps} | {med:.3f} | {28 * numel / med / 1e6:.0f} |")
    del opt, ps, graph
K._BLOCK, K._CHUNK, K._NUM_WARPS = defaults
PYEOF

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record rc
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    printf '%-14s rc=%-3s %4ss  %.90s\n' "$name" "$rc" "$(($(date +%s) - start))" "$*" | tee -a "$SUMMARY"
}

part env 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
part cuda_tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
part compile_cuda 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_compile.py -k cuda
part triton_interp 40 "$PY" -m pytest -q -rs -p no:cacheprovider -n 4 tests/test_triton.py
part bench 60 "$PY" benchmarks/step_time.py --device cuda --json "$OUTDIR/step_time.json"
part bench_kernel 45 "$PY" "$BENCH_PY"
part head2head 45 "$PY" benchmarks/step_time.py --device cuda --head-to-head --rounds 30
echo "overall: $([ $failed -eq 0 ] && echo all parts passed || echo some part failed)" | tee -a "$SUMMARY"
exit $failed
