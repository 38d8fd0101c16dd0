#!/usr/bin/env bash
# Three arms of run 24's recipe from its cached ViT, side by side on one GPU (run 26 in RESULTS.md):
#   A: no learned places, B: pos_lm (run 25), C: pos_lm in the cross-attention values only (pos_lm_keys=false).
# Usage (device): bash benchmarks/vision_poslm_diag.sh JOINT_S  -> $OUT/diag_{A,B,C}.log and _summary.json
set -u
J=${1:-240}
C="budget_joint_s=$J per_type=50 n_eval=[1,2,3,4] workers=4 pool_scenes=40000 resampler_halo=1 two_hop=true window_queries=true ground_weight=1.0 clip_dense_shape=1.0"
declare -A ARM=([A]="pos_lm=false" [B]="pos_lm=true" [C]="pos_lm=true pos_lm_keys=false")
for a in A B C; do
  timeout $((J + 200)) env PYTHONPATH=. python3 benchmarks/vision_shapebind.py --modes cross --out /tmp/diag_$a \
    --set $C ${ARM[$a]} --vit-cache runs/vit_cache > $OUT/diag_$a.log 2>&1 &
done
wait
for a in A B C; do
  cp /tmp/diag_$a/summary.json $OUT/diag_${a}_summary.json 2>/dev/null
  echo "== $a: ${ARM[$a]}"; grep -E "joint\] step|scene pool|ViT from" $OUT/diag_$a.log | cut -c1-160
  tail -45 $OUT/diag_$a.log | cut -c1-170
done
