#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a session lent a device machine (see docs/engine.md):
#   here:  echo /.whl/ >> .git/info/exclude
#          python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#              --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 gguf==0.19.0 importlib_metadata==10.2.0
#   then:  the device tool's run with command "bash tests/gpu_checks.sh", carry [".whl"], timeout_s 540
# Results land in $OUT (the device tool brings them back): nvidia-smi, the CUDA tests, the 12B streaming
# benchmark, the dequantization, attention and step-cache benchmarks.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1; free -g >> "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" > "$out/torch.txt" 2>&1
# CHECKS picks parts (default all): cuda offload dequant cache attention cpu-dequant cpu-dtype
checks=" ${CHECKS:-cuda offload dequant cache attention cpu-dequant cpu-dtype} "
if [[ $checks == *" cuda "* ]]; then
  timeout 60 python3 -m engine selftest --device cuda --speed-file "$out/speed-cuda.json" > "$out/selftest-cuda.txt" 2>&1
  # the fit verdicts and time estimates from the speed just measured (docs/estimates.md)
  mkdir -p logs && cp "$out/speed-cuda.json" logs/speed.json
  timeout 60 python3 -m bootstrap fit --models-dir /tmp > "$out/fit-cuda.txt" 2>&1
  tail -n 1 "$out/fit-cuda.txt"
  timeout 60 python3 -m tests.gpu_controlnet_check >> "$out/selftest-cuda.txt" 2>&1
  tail -n 1 "$out/selftest-cuda.txt"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gguf.py -k "cuda" \
    > "$out/cuda-tests.txt" 2>&1
  tail -n 3 "$out/cuda-tests.txt"
fi
if [[ $checks == *" offload "* ]]; then
  timeout 330 python3 -m tests.bench_offload --shape 12b --size 1024 --vram-cap-gb 8 --repeats 2 \
    > "$out/bench-12b.txt" 2>&1
  cat "$out/bench-12b.txt"
fi
if [[ $checks == *" dequant "* ]]; then
  timeout 120 python3 -m tests.bench_dequant --device cuda --repeats 5 > "$out/bench-dequant.txt" 2>&1
  cat "$out/bench-dequant.txt"
fi
if [[ $checks == *" attention "* ]]; then
  timeout 60 python3 -m tests.bench_attention > "$out/bench-attention.txt" 2>&1
  cat "$out/bench-attention.txt"
fi
if [[ $checks == *" cache "* ]]; then
  timeout 200 python3 -m tests.bench_cache --shape 12b --size 1024 > "$out/bench-cache.txt" 2>&1
  cat "$out/bench-cache.txt"
fi
if [[ $checks == *" cpu-dequant "* ]]; then  # the same table on the machine's CPU (bf16 compute)
  lscpu | grep -E "Model name|^CPU\(s\)" > "$out/bench-dequant-cpu.txt"
  grep -o -w -E "avx512_bf16|amx_bf16|avx512f" /proc/cpuinfo | sort -u | tr '\n' ' ' >> "$out/bench-dequant-cpu.txt"
  timeout 200 python3 -m tests.bench_dequant --device cpu --repeats 2 --layers "double mlp in,single linear2" \
    >> "$out/bench-dequant-cpu.txt" 2>&1
  cat "$out/bench-dequant-cpu.txt"
fi
if [[ $checks == *" cpu-dtype "* ]]; then  # fp32 against bf16 compute on the machine's CPU, real block width
  timeout 170 python3 -m tests.bench_cpu_dtype --sizes 1024 --repeats 1 > "$out/bench-cpu-dtype.txt" 2>&1
  cat "$out/bench-cpu-dtype.txt"
fi
