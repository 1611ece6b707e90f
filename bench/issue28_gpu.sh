#!/usr/bin/env bash
# Issue 28's GPU measurements, run on the device machine from the repository root with `.fp8/` carried
# (bench/issue28_prepare.sh makes it). Steps, in the order given, each writing under $OUT:
#   probe        bench/fp8_accum_probe.py: one FP8 matmul's error and ms per Qwen2.5-7B shape; row-wise
#                scales with/without fast accumulation; real 1x128 tile scales in each scale layout
#   bf16         the legal job cold in bf16, this checkout's src/ (issue 28 item 3 in)
#   bf16-before  the same with .fp8/src_before (30ba7b4, before item 3): item 3's seconds
#   fp8          the legal job cold with train.precision=fp8, src/ as it is
#   fp8-noacc    the same, forward without fast accumulation (.fp8/src_noacc)
#   fp8-tile     the same, forward with 1x128 tile scales (.fp8/src_tile)
#   warm         `warm` (the compile cache `bf16` left) and `warm-fp8` likewise, src/
# e.g. (one device call, <= 600 s): bash bench/issue28_gpu.sh probe bf16 fp8-noacc
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
pip install -q --no-deps --target /tmp/site .fp8/whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch,transformers,peft,torchao,sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, torchao.__version__)"
  date -u
} >> "$OUT/gpu.txt" 2>&1
job() {  # job <name> <src tree> <adapter_run case> [limit s]
  echo "$(date -u +%T) $1" >> "$OUT/steps.txt"
  BENCH_SRC="$PWD/$2" python bench/adapter_run.py --cases "$3" --work /tmp/ct --logs "$OUT/$1" \
    --limit "${4:-260}" > "$OUT/$1.out" 2>&1
  tail -2 "$OUT/$1.out"
}
for step in "$@"; do
  case "$step" in
    probe) timeout 60 python bench/fp8_accum_probe.py > "$OUT/probe.jsonl" 2> "$OUT/probe.err" ;;
    bf16) job bf16 src cold ;;
    bf16-before) job bf16-before .fp8/src_before cold ;;
    fp8) job fp8 src cold-fp8 ;;
    fp8-noacc) job fp8-noacc .fp8/src_noacc cold-fp8 ;;
    fp8-tile) job fp8-tile .fp8/src_tile cold-fp8 ;;
    warm) job warm src warm,warm-fp8 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
