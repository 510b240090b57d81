#!/bin/bash
# The bundled model's tuned grids: null class and guided (s = 2) runs, resumable (each finished
# (solver, NFE) is kept in the JSON and the grids file; a rerun skips it), then the merge into
# genie_fast/assets/fmnist_genie.grids.json. One thread each; the two runs may go side by side.
#   bash bench/results/tuned_bundled/run.sh null | guided | merge
set -e
cd "$(dirname "$0")/../../.."
export PYTHONPATH=. OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
D=bench/results/tuned_bundled
runs() {  # solver:NFE for the default solver first, then unipc, dpmpp_2m, ipndm
    local out=""
    for s in genie_multistep unipc dpmpp_2m ipndm; do for n in "$@"; do out=$out,$s:$n; done; done
    echo "${out#,}"
}
case "$1" in
  null) $PY bench/bench_tuned_grids.py bench/results/grids_cond6/null.json --runs "$(runs 5 4 3 6 8 10)" \
          --n 64 --max-evals 40 --threads 1 --json $D/null.json --store $D/fmnist_genie.grids.json ;;
  guided) $PY bench/bench_tuned_grids.py bench/results/grids_cond6/guided.json --runs "$(runs 5 3 6 8 10)" \
          --n 64 --max-evals 40 --threads 1 --json $D/guided.json --store $D/guided.grids.json ;;
  merge) $PY $D/merge.py ;;
  *) echo "usage: $0 null | guided | merge" >&2; exit 2 ;;
esac
