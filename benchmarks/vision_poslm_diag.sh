#!/usr/bin/env bash
# Arms of the default recipe (run 36's: two_hop, dense-shape CLIP, place_readout), side by side on one GPU from one
# CLIP-trained ViT (runs 26+ in RESULTS.md; before run 36 the script set those, then not the defaults). Each arm
# is a name and its recipe overrides, e.g.
#   bash benchmarks/vision_poslm_diag.sh 400 100 "B:pos_lm=true" "C:pos_lm=true pos_lm_keys=false"
# (joint seconds, questions per cell, arms) -> $OUT/arms.tgz: <name>.log, <name>_summary.json, <name>_metrics.jsonl.
# The ViT comes from runs/vit_cache (carry it); without one there, the CLIP stage runs first ($CLIP_S seconds, default
# 150; again if its held-out top-1 is below 0.99 or its dense head's shape top-1 on object patches below 0.8) and its
# ViT is copied to $OUT/vit_cache, to carry into the next call. (One archive: the device brings back only a few files.)
# 60 s of CLIP gave ViTs anywhere from strong on shape (run 24) to weak (runs 28, 30); 150 s gave 0.96 (run 35).
set -u
J=$1; P=$2; shift 2
W=$(( $# > 0 ? 15 / $# : 10 )); [ $W -gt 10 ] && W=10  # data workers per arm: the device has 16 cores
C="budget_joint_s=$J per_type=$P workers=$W budget_clip_s=${CLIP_S:-150}"  # the rest: Recipe's defaults (run 36's recipe)
A=/tmp/arms; mkdir -p $A runs/vit_cache && chmod -R u+rw runs/vit_cache
weak_vit() { python3 -c "import glob, json, sys; c = json.load(open(glob.glob('runs/vit_cache/vit_*.json')[0]))['clip']
print('CLIP:', {k: v for k, v in c.items() if not isinstance(v, (list, dict))})
sys.exit(c['retrieval_top1'] >= 0.99 and c.get('object_shape_top1', 1.0) >= 0.8)"; }
# a 60 s CLIP stage sometimes stops mid-fall (run 28: top-1 0.91 against 1.00): such a ViT is trained once more
for try in 1 2; do
  ls runs/vit_cache/vit_*.safetensors > /dev/null 2>&1 && break
  env PYTHONPATH=. python3 benchmarks/vision_shapebind.py --modes "" --out /tmp/arm_clip --set $C workers=14 \
    --vit-cache runs/vit_cache > $A/clip_$try.log 2>&1
  tail -1 $A/clip_$try.log
  if weak_vit && [ $try = 1 ]; then rm runs/vit_cache/vit_*; fi
  mkdir -p $OUT/vit_cache && cp runs/vit_cache/* $OUT/vit_cache/ 2>/dev/null
done
for arm in "$@"; do
  name=${arm%%:*}; sets=${arm#*:}
  timeout $((J + 180)) env PYTHONPATH=. python3 benchmarks/vision_shapebind.py --modes cross --out /tmp/arm_$name \
    --set $C $sets --vit-cache runs/vit_cache > $A/$name.log 2>&1 &
done
wait
for arm in "$@"; do
  name=${arm%%:*}
  cp /tmp/arm_$name/summary.json $A/${name}_summary.json 2>/dev/null
  cp /tmp/arm_$name/cross_metrics.jsonl $A/${name}_metrics.jsonl 2>/dev/null
  echo "== $arm"; grep -E "joint\] step|scene pool|ViT from" $A/$name.log | cut -c1-160
  grep -A 40 "held-out accuracy" $A/$name.log | cut -c1-170
done
tar czf $OUT/arms.tgz -C $A .
