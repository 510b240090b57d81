#!/bin/sh
# Run the lab's jobs one after another (one heavy process at a time), each resumable:
#   sh bench/head_lab/run_queue.sh STEPS name1 name2 ...   (names of heads.CANDIDATES; NAME:TAG:FRAC:STEPS overrides)
ulimit -v 12000000
STEPS=$1; shift
for spec in "$@"; do
  name=$(echo "$spec" | cut -d: -f1); tag=$(echo "$spec" | cut -s -d: -f2); frac=$(echo "$spec" | cut -s -d: -f3)
  st=$(echo "$spec" | cut -s -d: -f4)
  nice -n 10 .venv/bin/python bench/head_lab/train.py "$name" --steps "${st:-$STEPS}" --tag "$tag" \
      --data-frac "${frac:-1.0}" --resume || echo "FAILED $spec"
done
