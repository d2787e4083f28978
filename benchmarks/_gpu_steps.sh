# Shared by benchmarks/run_gpu.sh and benchmarks/gpu_check.sh (sourced, not run).
#
# step NAME LIMIT_S LOG CMD...  runs CMD (a program, or a function exported with export -f) under `timeout LIMIT_S` (SIGINT first, so pytest still
#     writes its summary, then SIGKILL 10 s later), its output in $OUT/LOG, and prints one summary
#     line:  "STEP NAME: ok|FAILED (exit N)|TIMEOUT after S s | N s | <last line of the log>".
#     The lines are also appended to $OUT/summary.txt, which the scripts print again at the end.
#     A step never gets more than what is left of the run's budget (left()).
# install_carried_wheels DIR     installs, with --no-index from DIR, the packages from
#     benchmarks/gpu_wheels.txt that do not import (a bare GPU image has no defusedxml,
#     pycocotools, pytest-benchmark...); says what it installs.

START=${START:-$(date +%s)}
left() { echo $(( START + TOTAL - $(date +%s) )); }

step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local remaining
    remaining=$(( $(left) - 5 ))
    if [ "$remaining" -lt 10 ]; then
        echo "STEP $name: SKIPPED (no time left) | 0 s |" | tee -a "$OUT/summary.txt"
        return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    if [ "$limit" -lt 10 ]; then
        echo "STEP $name: SKIPPED (no time left) | 0 s |" | tee -a "$OUT/summary.txt"
        return 0
    fi
    local t0=$SECONDS rc status
    # bash -c: CMD may be a shell function of the calling script (export -f it)
    timeout -s INT -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|130|137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    echo "STEP $name: $status | $(( SECONDS - t0 )) s | $(grep -v '^\s*$' "$OUT/$log" | tail -n 1 | cut -c1-200)" \
        | tee -a "$OUT/summary.txt"
    return $rc
}

install_carried_wheels() {
    local dir=$1
    local missing=()
    while read -r module package; do
        case "$module" in ''|'#'*) continue ;; esac
        python -c "import $module" 2> /dev/null || missing+=("$package")
    done < benchmarks/gpu_wheels.txt
    if [ ${#missing[@]} -eq 0 ]; then
        echo "carried wheels: nothing to install (every package imports)"
        return 0
    fi
    if [ ! -d "$dir" ]; then
        echo "carried wheels: missing ${missing[*]}, and no folder $dir (run benchmarks/fetch_gpu_wheels.sh here, carry $dir)"
        return 1
    fi
    echo "carried wheels: installing ${missing[*]} from $dir"
    pip install --no-index --no-deps --find-links "$dir" "${missing[@]}"
}
export -f install_carried_wheels
