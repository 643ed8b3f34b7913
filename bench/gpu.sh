#!/usr/bin/env bash
# The GPU checks in one command, for a session that is lent a GPU machine (see README,
# "Performance"): the CUDA-only tests, then bench/train.py at full size, bench/extract.py and
# bench/intervene.py, each under its own time limit so one slow step cannot eat the lease.
# It runs on the machine's own python3 (CUDA PyTorch, transformers, pyarrow: no venv travels).
#
#   bash bench/gpu.sh            # logs and JSON lines go to $OUT (the device tool) or bench-gpu/
#
# About 6 minutes on an H100; give the call timeout_s 540 or more.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

step() {  # step NAME SECONDS COMMAND...: run, keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 3 "$out/$name.log"
    echo "== $name: exit $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step cuda-tests 180 "$py" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_sae.py tests/test_families.py tests/test_training.py
step train 240 "$py" bench/train.py
step extract 150 "$py" bench/extract.py --n-images 1024 --batch-size 256 --n-workers 8
step intervene 90 "$py" bench/intervene.py --batch 32
# The last JSON line of each bench, together, for the README and the issue note.
for b in train extract intervene; do
    grep '^{' "$out/$b.log" | tail -n 1
done >"$out/summary.jsonl"
cat "$out/summary.jsonl"
