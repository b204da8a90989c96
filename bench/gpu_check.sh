#!/usr/bin/env bash
# Runs bench/gpu_check.py on a lent GPU machine (the device tool's `run`), or fetches the wheels it needs.
#
#   bash bench/gpu_check.sh --fetch-wheels [DIR]   # here, once: DeepSpeed and its missing deps as wheels
#                                                  # into DIR (default .whl, kept out of git)
#   bash bench/gpu_check.sh [gpu_check.py args]    # there: device tool run, carry [".whl"], timeout_s 600
#
# The GPU image has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17 and no DeepSpeed, and cannot
# reach any index. So the wheels travel with the tree: this script installs those the image lacks
# (or has older) with --no-deps and --no-index, never touching its torch, installs rigl_ds with
# --no-deps (or puts the tree on PYTHONPATH), prints the versions, and runs the check under `timeout`
# with --out $OUT, tee-ing the log to $OUT/gpu_check.log. Wheels are looked for in $WHEELS, .whl/,
# wheels/, shared/wheels/.
set -u
cd "$(dirname "$0")/.."

WHEEL_PINS="deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 typing-extensions==4.16.0"

if [ "${1:-}" = "--fetch-wheels" ]; then
    dir="${2:-.whl}"
    mkdir -p "$dir"
    py="${PYTHON:-python3}"
    # deepspeed is published as a source distribution only: build its pure-Python wheel here
    # (DS_BUILD_OPS=0: no compiled ops; it JIT-builds what it needs, and gpu_check needs none).
    # --no-build-isolation uses this environment's torch for its setup.py.
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8 || exit 1
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" $(echo "$WHEEL_PINS" | tr ' \n' '\n\n' | grep -v '^deepspeed==') || exit 1
    case "$dir" in
        /*) ;;
        *) # The device README's way: ignored by git (so never committed), and named in `carry`.
           exclude=$(git rev-parse --git-path info/exclude 2>/dev/null)
           if [ -n "$exclude" ] && ! git check-ignore -q "$dir/x.whl"; then
               mkdir -p "$(dirname "$exclude")"
               echo "/${dir%/}/" >> "$exclude"
           fi ;;
    esac
    ls -l "$dir"
    du -sh "$dir"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29555}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1
export TOKENIZERS_PARALLELISM=false

wheel_dir=""
for d in "${WHEELS:-}" .whl wheels shared/wheels; do
    if [ -n "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then wheel_dir="$d"; break; fi
done

if [ -n "$wheel_dir" ]; then
    # Only wheels whose package is missing or older than the wheel: never downgrade the image.
    needed=$("$PY" - "$wheel_dir" <<'EOF'
import pathlib, re, sys
from importlib import metadata


def key(version):
    return tuple(int(x) for x in re.findall(r"\d+", version))


for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        have = None
    if have is None or key(have) < key(version):
        print(whl)
EOF
) || needed=$(ls "$wheel_dir"/*.whl)  # cannot tell what is installed: install them all
    if [ -n "$needed" ]; then
        echo "gpu_check.sh: installing $(echo "$needed" | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir $needed; then
            echo "gpu_check.sh: site-packages not writable; installing to /tmp/site"
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $needed || exit 3
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
elif ! "$PY" -c "import deepspeed" 2>/dev/null; then
    echo "gpu_check.sh: no DeepSpeed here and no wheels in \$WHEELS, .whl/, wheels/ or shared/wheels/:"
    echo "  run 'bash bench/gpu_check.sh --fetch-wheels' where pip can reach an index, and carry .whl"
    echo "  (the radix section needs no DeepSpeed and still runs)"
fi

# rigl_ds itself, without its dependencies (the image's torch and transformers stay).
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . >"$OUT/pip_rigl_ds.log" 2>&1; then
    echo "gpu_check.sh: pip install of rigl_ds failed (see pip_rigl_ds.log); using the tree on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
for name in ("deepspeed", "transformers", "pydantic", "rigl_ds"):
    try:
        module = __import__(name)
        print(name, module.__version__, module.__file__)
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

set -o pipefail
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
code=$?
echo "gpu_check.sh: exit $code (124: the timeout cut it short; 1: a section FAILed); results in $OUT/gpu_check.jsonl"
exit $code
