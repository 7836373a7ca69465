#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent GPU machine (CI has none):
# the GPU-marked tests (PGS selection without host synchronisation, the key-padding mask in
# bf16, every method's bf16 step on ViT-B/16, the topology methods included), the PGS
# step-time benchmark on ViT-B/16 with the largest batch that fits, with a profile of the
# selector, Multi(32, 16) against CLIP on ViT-B/16 in bf16 (step time, peak memory), and
# seconds per OTI / OVI inversion on ViT-B/32 at the largest batch that fits.
#
# The machine's own python3 has torch; packages it lacks travel as wheels in .whl/ (git
# ignores it), installed into /tmp/site. Fetch them once where pip reaches PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 POT==0.9.7.post1
# Results go to $OUT (or ./gpu_out) as gpu_check.log.
source "$(dirname "$0")/gpu_env.sh" gpu_check.log
nvidia-smi -L
python3 -c "import torch, ot, open_clip; print('torch', torch.__version__, 'POT', ot.__version__,
'open_clip', open_clip.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m pytest -p no:cacheprovider -m gpu -q -rs tests/test_pgs_model.py tests/test_gpu_paths.py
tests_rc=$?
for batch in ${GPU_BATCHES:-1024 512 256}; do
    python3 -m benchmarks.bench_pgs --device cuda --arch ViT-B-16 --batch-size "$batch" --steps 20 \
        --profile-selection && break
    echo "batch $batch did not fit or failed; trying a smaller one"
done
for batch in ${GPU_BATCHES:-1024 512 256}; do
    python3 -m benchmarks.bench_topology_step --device cuda --arch ViT-B-16 --batch-size "$batch" \
        --steps 20 && break
    echo "batch $batch did not fit or failed; trying a smaller one"
done
python3 -m benchmarks.bench_inversion --device cuda --arch ViT-B-32 --steps 20
exit $tests_rc
