#!/usr/bin/env bash
# The measurements that need a GPU, as one script for a session that is lent one. Each step is one
# command of well under 10 minutes on an H100; the files it writes to the folder $OUT (at most
# seven: the device tool returns eight) are then committed under experiments/results/. The GPU
# image has its own torch, triton and transformers but not this package's other dependencies, so
# the script runs from the checkout (PYTHONPATH) and writes no report there (adjustText is
# missing): draw it afterwards with `tokencomp report experiments/results/demo-<gpu>`.
#
#   bash experiments/gpu_session.sh kernels   # kernel table, then the launch-setting sweep
#   bash experiments/gpu_session.sh models    # demo grid on CUDA float16; prefill at 7B shapes, 32 layers;
#                                             # host syncs counted against CUDA's sync debug mode
set -euo pipefail
: "${OUT:?OUT must name the folder the results go to}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
    'transformers', transformers.__version__, torch.cuda.get_device_name())"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())") # h100, h200

case "${1:-}" in
kernels)
    python3 experiments/bench_kernels.py --out "$OUT/kernels-$gpu.md" >"$OUT/kernels.log" 2>&1
    python3 experiments/bench_kernels.py --sweep --out "$OUT/kernels-sweep-$gpu.md" >"$OUT/kernels-sweep.log" 2>&1
    tail -n 3 "$OUT/kernels.log" "$OUT/kernels-sweep.log"
    ;;
models)
    run=/tmp/demo-$gpu
    python3 -m tokencomp.cli compare experiments/demo.toml --device cuda --dtype float16 --out "$run" \
        --no-report >"$OUT/demo.log" 2>&1
    cp "$run/results.jsonl" "$run/experiment.toml" "$run/models.json" "$OUT/"
    python3 experiments/bench_prefill.py --layers 32 --repeats 20 --out "$OUT/prefill-7b-shapes-$gpu.md"
    python3 experiments/host_syncs.py experiments/demo.toml --device cuda --dtype float16 \
        --run-dir "$run-syncs" --out "$OUT/host-syncs-$gpu.md" >"$OUT/host-syncs.log" 2>&1
    ;;
*)
    echo "usage: bash experiments/gpu_session.sh kernels|models" >&2
    exit 2
    ;;
esac
