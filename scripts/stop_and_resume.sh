#!/usr/bin/env bash
# Stop a training run with SIGTERM once it has logged STEP steps, resume it with
# log.resume=auto, and compare every logged step metric with a reference run that was never
# stopped (the measurement behind the README's "Checkpoints, preemption and resuming").
#
#   scripts/stop_and_resume.sh CONFIG NAME STEP [REFERENCE_METRICS] [overrides...]
#
# e.g. scripts/stop_and_resume.sh configs/demo-smollm2.yaml demo-resume 15 \
#          docs/results/demo-smollm2-s8-metrics.jsonl log.checkpoint_every=10
# Prints when the signal was sent, the first session's exit status (143 expected), the second
# session's, and how many steps match the reference (all metrics but times). Needs the runs
# directory to be ./runs (the default log.run_dir). CLI=... and PYTHON=... pick the command and
# the interpreter (default .venv/bin/vlm-treegrpo and .venv/bin/python).
set -u
CONFIG=$1; NAME=$2; STEP=$3; shift 3
REF=""
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then REF=$1; shift; fi  # (an override has an "=")
CLI=${CLI:-.venv/bin/vlm-treegrpo}  # (a command: may be "python -m vlm_treegrpo.cli")
RUN=runs/$NAME
rm -rf "$RUN"
T0=$(date +%s)
$CLI train --config "$CONFIG" log.name="$NAME" log.progress=false "$@" > "$RUN.first.log" 2>&1 &
PID=$!
while [ "$(cat "$RUN/metrics.jsonl" 2>/dev/null | wc -l)" -lt "$STEP" ]; do
    kill -0 "$PID" 2>/dev/null || { echo "the run ended before step $STEP"; exit 1; }
    sleep 0.2
done
echo "SIGTERM at $(( $(date +%s) - T0 )) s, after $(wc -l < "$RUN/metrics.jsonl") logged steps"
kill -TERM "$PID"; wait "$PID"; echo "first session: exit $? at $(( $(date +%s) - T0 )) s"
$CLI train --config "$CONFIG" log.name="$NAME" log.progress=false log.resume=auto "$@" > "$RUN.second.log" 2>&1
echo "second session: exit $? at $(( $(date +%s) - T0 )) s"
if [ -n "$REF" ]; then
    ${PYTHON:-.venv/bin/python} - "$REF" "$RUN/metrics.jsonl" <<'PY'
import sys
from vlm_treegrpo.analysis.plots import read_rows, timeless
ref, got = ([timeless(r) for r in read_rows(p)] for p in sys.argv[1:3])
same = sum(1 for a, b in zip(ref, got) if {k: a[k] for k in a if k in b} == {k: b[k] for k in a if k in b})
print(f"steps matching the reference: {same} of {len(ref)} (resumed run logged {len(got)})")
PY
fi
