#!/usr/bin/env bash
# Stop a training run with SIGTERM once it has logged STEP steps, resume it with
# log.resume=auto, and compare every logged step metric with a reference run that was never
# stopped (the measurement behind the README's "Checkpoints, preemption and resuming").
#
#   scripts/stop_and_resume.sh CONFIG NAME STEP [REFERENCE_METRICS] [overrides...]
#
# e.g. scripts/stop_and_resume.sh configs/demo-smollm2.yaml demo-resume 15 \
#          runs/demo-smollm2/metrics.jsonl log.checkpoint_every=10
# Prints when the signal was sent, the first session's exit status (143 expected), the second
# session's, and how many steps match the reference (all metrics but times). Needs the runs
# directory to be ./runs (the default log.run_dir). CLI=... and PYTHON=... pick the command and
# the interpreter (default .venv/bin/vlm-treegrpo and .venv/bin/python). With a reference, the
# figures are written as the record stop-and-resume-NAME under benchmarks/records/ (NO_RECORD=1: not).
set -u
COMMAND="scripts/stop_and_resume.sh $*"
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
SIG_AT=$(( $(date +%s) - T0 )); LOGGED=$(wc -l < "$RUN/metrics.jsonl")
echo "SIGTERM at $SIG_AT s, after $LOGGED logged steps"
kill -TERM "$PID"; wait "$PID"; FIRST=$?; echo "first session: exit $FIRST at $(( $(date +%s) - T0 )) s"
$CLI train --config "$CONFIG" log.name="$NAME" log.progress=false log.resume=auto "$@" > "$RUN.second.log" 2>&1
SECOND=$?; TOTAL=$(( $(date +%s) - T0 )); echo "second session: exit $SECOND at $TOTAL s"
if [ -n "$REF" ]; then
    ${PYTHON:-.venv/bin/python} - "$REF" "$RUN/metrics.jsonl" "$NAME" "$COMMAND" "$SIG_AT" "$LOGGED" "$FIRST" "$SECOND" "$TOTAL" <<'PY'
import os
import sys

from vlm_treegrpo.analysis.plots import read_rows, timeless
from vlm_treegrpo.analysis.records import write_record

name, command = sys.argv[3:5]
sig_at, logged, first, second, total = (int(x) for x in sys.argv[5:10])
ref, got = ([timeless(r) for r in read_rows(p)] for p in sys.argv[1:3])
same = sum(1 for a, b in zip(ref, got) if {k: a[k] for k in a if k in b} == {k: b[k] for k in a if k in b})
print(f"steps matching the reference: {same} of {len(ref)} (resumed run logged {len(got)})")
if os.environ.get("NO_RECORD") != "1":
    figures = {"sigterm_at_s": sig_at, "steps_logged_at_sigterm": logged, "first_exit": first, "second_exit": second,
               "seconds": total, "steps_matching_reference": same, "reference_steps": len(ref), "resumed_run_steps": len(got),
               "reference": sys.argv[1]}
    print(f"wrote {write_record(f'stop-and-resume-{name}', figures, command=command)}")
PY
fi
