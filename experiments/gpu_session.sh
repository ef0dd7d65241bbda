#!/usr/bin/env bash
# The measurements that need a GPU, as one script for a session that is lent one. A session has
# about 15 minutes of device time in all, the machine's start included, and one call may run 10
# minutes: `all` does everything in one call of at most about 9.5 minutes (520 s of step limits,
# 5 s of grace each, the imports), each step under a time limit of its own, so that a slow or
# failing step costs only its own share and the later steps still run. A step stopped at its
# limit gets SIGINT first: the benchmarks have written their table after every shape or setting,
# and compare keeps its finished cells. What comes back in
# $OUT (seven files; the device tool returns eight) is committed under experiments/results/:
#   session.log                 every step's output, with its exit code
#   kernels-<gpu>.md            kernel table (bench_kernels.py), partial if cut short
#   kernels-sweep-<gpu>.md      launch-setting sweep (bench_kernels.py --sweep)
#   demo-<gpu>.tgz              the demo grid's run directory on CUDA float16, without its
#                               generated images: `tar xzf demo-<gpu>.tgz -C runs`, copy data/ from
#                               a local demo run (`cp -r runs/demo/data runs/demo-<gpu>/`, the
#                               same images, for the overlay plots), `tokencomp report
#                               runs/demo-<gpu>`, and commit it as experiments/results/demo is
#   prefill-7b-shapes-<gpu>.md  prefill at LLaVA-1.5-7B shapes, all 32 layers
#   decode-cache-<gpu>.md       decoding steps over a reserved KV buffer vs concatenation
#   host-syncs-<gpu>.md         host syncs: the CPU counter beside CUDA's sync debug mode
# The GPU image has its own torch, triton and transformers but not this package's other
# dependencies, so the script runs from the checkout (PYTHONPATH) and draws no report (adjustText
# is missing there).
#
#   bash experiments/gpu_session.sh all       # everything below, in order
#   bash experiments/gpu_session.sh kernels   # kernel table, then the launch-setting sweep
#   bash experiments/gpu_session.sh models    # demo grid; prefill and decoding at 7B shapes; host syncs
set -uo pipefail
: "${OUT:?OUT must name the folder the results go to}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

# step NAME SECONDS COMMAND...: run under a time limit (SIGINT at the limit, SIGKILL 5 s later)
step() {
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name: start $(date +%T), limit ${limit} s"
    timeout --signal=INT --kill-after=5 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc at $(date +%T)$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (time limit)')"
    [ "$rc" -eq 0 ] || failed=1
}

kernels() {
    step "kernel table" 180 python3 experiments/bench_kernels.py --out "$OUT/kernels-$gpu.md"
    step "launch-setting sweep" 70 python3 experiments/bench_kernels.py --sweep --out "$OUT/kernels-sweep-$gpu.md"
}

models() {
    local run=runs/demo-$gpu # its predictions name their images relative to it (data/...)
    step "demo grid" 150 python3 -m tokencomp.cli compare experiments/demo.toml --device cuda --dtype float16 \
        --out "$run" --no-report
    # without the generated images (25 MB; the tool returns 16 MiB a file): the same as a local demo run's
    [ -d "$run" ] && tar czf "$OUT/demo-$gpu.tgz" -C runs --exclude=.lock --exclude="demo-$gpu/data" "demo-$gpu"
    step "prefill at 7B shapes" 60 python3 experiments/bench_prefill.py --layers 32 --repeats 20 \
        --out "$OUT/prefill-7b-shapes-$gpu.md"
    step "decoding over the KV cache" 20 python3 experiments/bench_decode_cache.py --batch 1 8 32 64 \
        --out "$OUT/decode-cache-$gpu.md"
    step "host syncs" 40 python3 experiments/host_syncs.py experiments/demo.toml --device cuda --dtype float16 \
        --run-dir "$run-syncs" --out "$OUT/host-syncs-$gpu.md"
}

session() {
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
        'transformers', transformers.__version__, torch.cuda.get_device_name())" || return 1
    gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())") # h100, h200
    case "$1" in
    all) kernels; models ;;
    kernels) kernels ;;
    models) models ;;
    esac
    ls -l "$OUT"
    return $failed
}

case "${1:-}" in
all | kernels | models) ;;
*)
    echo "usage: bash experiments/gpu_session.sh all|kernels|models" >&2
    exit 2
    ;;
esac
session "$1" 2>&1 | tee -a "$OUT/session.log"
exit "${PIPESTATUS[0]}"
