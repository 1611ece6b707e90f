#!/usr/bin/env bash
# Issue 28's GPU calls, prepared on this machine (it reaches PyPI; the device machine reaches nothing):
# .fp8/ (git-ignored, carried to the device with `carry: [".fp8"]`, ~43 MiB) gets
#   whl/          torchao (FP8 comparison), jieba / nltk / rouge-score (the sample answers' metrics)
#   src_before/   src/ at 30ba7b4, before issue 28 item 3 (the bf16 "before" of the whole job)
#   src_noacc/    src/ with bench/fp8/forward-exact-accumulation.patch (forward without fast accumulation)
#   src_tile/     src/ with both patches: 1x128 tile scales in the forward (DeepSeek-V3's FP8 recipe)
# Then: bench/issue28_gpu.sh on the device. Re-run after src/ changes.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.fp8
mkdir -p "$D/whl"
pip wheel -q --no-deps -w "$D/whl" torchao==0.18.0 jieba==0.42.1 nltk==3.10.4 rouge_score==0.1.2
rm -rf "$D/src_before" "$D/src_noacc" "$D/src_tile" "$D/tmp"
mkdir -p "$D/tmp"
git archive 30ba7b4 src | tar -x -C "$D/tmp"
mv "$D/tmp/src" "$D/src_before"
rm -rf "$D/tmp"
for v in noacc tile; do
  cp -r src "$D/src_$v"
  find "$D/src_$v" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$D/src_$v"/*.egg-info
  patch -s -p2 -d "$D/src_$v" < bench/fp8/forward-exact-accumulation.patch
done
# the tile patch is written against the exact-accumulation tree
patch -s -p2 -d "$D/src_tile" < bench/fp8/tile-scales.patch
du -sh "$D"
