#!/usr/bin/env bash
# Several ShapeBind runs at once on one GPU, then their logs and results gathered in DEST.
#
# Measured since (benchmarks/RESULTS.md, run 14): a cross-attention run keeps an H200 about 93% busy, so runs side by
# side only share it; three at once ruined all three. Kept for runs that are small enough to leave the GPU idle.
# Every run records its own steps/s, so a slowdown shows in its log and summary.
#
#   usage: benchmarks/vision_parallel.sh DEST NAME="ARGS" [NAME="ARGS" ...]
#   e.g.   benchmarks/vision_parallel.sh $OUT keys64="--modes cross --set resampler_halo=1 halo_keys_only=true"
#
# DEST/NAME.log is a run's stdout and stderr (the table at its end); DEST/runs.tar.gz holds each run's summary.json,
# *_eval.json and *_metrics.jsonl (no checkpoints).
set -u
dest=$1
shift
work=$(mktemp -d)
pids=()
for spec in "$@"; do
  name=${spec%%=*}
  args=${spec#*=}
  # shellcheck disable=SC2086  # ARGS is a list of arguments
  PYTHONPATH=. python3 benchmarks/vision_shapebind.py --out "$work/$name" $args >"$dest/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
(cd "$work" && tar czf "$dest/runs.tar.gz" --exclude='*.safetensors' --exclude='*/inline' --exclude='*/cross' .)
for spec in "$@"; do tail -n 14 "$dest/${spec%%=*}.log"; done
exit $status
