# Sourced by the GPU scripts (gpu_check.sh, gpu_levers.sh) on a lent GPU machine, with the log
# file's name as $1: the environment, the output folder ($OUT, or ./gpu_out) with everything
# printed copied into it, and the wheels the machine's own python3 lacks (.whl/, ignored by git)
# installed into /tmp/site.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0
out=${OUT:-gpu_out}
mkdir -p "$out"
exec > >(tee "$out/$1") 2>&1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
