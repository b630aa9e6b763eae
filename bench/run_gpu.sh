#!/usr/bin/env bash
# On a CUDA machine with torch and triton installed: install slicecompile in place, then run
# the named parts (default: all) — tests: the test suite on the GPU and the demo; kernels: the
# kernel-variant sweep, the dropout_linear benchmarks (bf16, fp16, fp32) and the block sweep
# behind DEFAULT_BLOCK; output: the linear_dropout (output side) benchmark and its block sweep;
# attention: the attention tests and the fused attention against SDPA, per kernel variant; probe: every
# attention kernel candidate checked and timed;
# lora: a PEFT LoRA Llama's training step (needs peft); gpt2: GPT-2-style blocks' training step;
# encoder: the 4-layer encoder training step; slice: the slice policy and the compact saved input
# against cuBLAS; memory: the encoder step's peak memory; wrn: Wide ResNet blocks; frontier: the
# language model at equal wall-clock budgets, and its step profile; distributed: the encoder step
# under DDP on every GPU of the machine; verdicts: what rewrite="auto" decides at the benchmarks'
# shapes; hashed: the hashed-outputs loss against the dense one. CSV rows go to bench/results/,
# logs to ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
parts=${*:-tests kernels output attention lora gpt2 encoder slice memory wrn frontier distributed verdicts hashed}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
for part in $parts; do
  case $part in
    tests)
      python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$out/pytest_gpu.log" | tail -15
      python3 -m slicecompile demo 2>&1 | tee "$out/demo_gpu.log" ;;
    kernels)
      python3 bench/sweep_kernel_configs.py --shape 8192 4096 4096 --p 0.5 --csv bench/results/kernel_configs.csv \
        2>&1 | tee "$out/sweep_kernel_configs.log"
      S="--shapes 8192,4096,4096 8192,16384,4096 16384,4096,16384 4096,1024,4096"
      python3 bench/bench_dropout_linear.py $S --p 0 0.1 0.25 0.5 0.75 --providers dense dropout_eager limit \
        slicecompile 2>&1 | tee "$out/bench_bf16.log"
      python3 bench/bench_dropout_linear.py $S --p 0.1 0.5 --providers dropout_inductor slicecompile_inductor 2>&1 \
        | tee "$out/bench_bf16_inductor.log"
      python3 bench/bench_dropout_linear.py $S --dtype float16 --p 0 0.1 0.5 --providers dense dropout_eager limit \
        slicecompile 2>&1 | tee "$out/bench_fp16.log"
      python3 bench/bench_dropout_linear.py --dtype float32 --p 0.5 --providers dense dropout_eager limit slicecompile \
        2>&1 | tee "$out/bench_fp32.log"
      python3 bench/bench_dropout_linear.py --shapes 8192,4096,4096 --p 0.5 --providers dense slicecompile \
        --blocks 64,64 64,128 128,64 128,128 256,128 128,256 --csv dropout_linear_blocks.csv 2>&1 \
        | tee "$out/bench_blocks.log" ;;
    output)
      S="--shapes 8192,4096,4096 8192,16384,4096 16384,4096,16384 4096,1024,4096"
      python3 bench/bench_dropout_linear.py --side output $S --p 0 0.1 0.5 --providers dense dropout_eager \
        dropout_inductor limit slicecompile slicecompile_inductor 2>&1 | tee "$out/bench_output_bf16.log"
      python3 bench/bench_dropout_linear.py --side output --shapes 8192,4096,4096 --p 0.5 \
        --providers dense slicecompile --blocks 64,64 64,128 128,64 128,128 256,128 128,256 \
        --csv linear_dropout_blocks.csv 2>&1 | tee "$out/bench_output_blocks.log" ;;
    attention)
      # One call checks and times every kernel variant within ATTENTION_DEADLINE_S (default 460 s) of
      # this part's start. First, side by side (compiling bounds them, not the GPU): the attention tests
      # once per variant, inspect_kernels.py (no GPU), and the benchmark's checks alone, which compile
      # every kernel it will time. Inductor's caches are off in the tests: the autograd cache is keyed
      # on Dynamo's graph, which a variant does not change, so it would hand one variant's code to
      # another. Then the benchmark alone, untuned (each kernel's first candidate config), starting no
      # configuration past the deadline, two rounds (three would leave p = 0.5 out). ATTENTION_TESTS=0
      # skips the tests; ATTENTION_ARGS are appended to the benchmark's arguments.
      start=$SECONDS
      attention_tests() {  # log name, then the variant's VAR=value settings
        local log="$out/pytest_gpu_attention_$1.log"
        shift
        env "$@" TORCHINDUCTOR_AUTOGRAD_CACHE=0 TORCHINDUCTOR_FX_GRAPH_CACHE=0 timeout "${ATTENTION_TEST_S:-180}" \
          python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_kernels.py \
          tests/ops/test_dropout_attention.py tests/compiler/test_attention.py > "$log" 2>&1
        printf "\nexit status %s (124: stopped after %s s)\n" $? "${ATTENTION_TEST_S:-180}" >> "$log"
      }
      if [ "${ATTENTION_TESTS:-1}" = 1 ]; then
        attention_tests plain &
        attention_tests tma SLICECOMPILE_ATTENTION_TMA=1 &
        attention_tests tma_ws SLICECOMPILE_ATTENTION_TMA=1 SLICECOMPILE_ATTENTION_WS=1 &
      fi
      if [ -f bench/inspect_kernels.py ]; then
        timeout "${ATTENTION_TEST_S:-180}" python3 bench/inspect_kernels.py --kernels attention \
          --csv "$out/inspect_kernels.csv" > "$out/inspect_kernels.log" 2>&1 || true &
      fi
      A="--shapes 8,12,1024,64 4,16,2048,128 16,12,512,64 2,32,4096,128 --causal 0 1 --p 0.1 0.5
         --providers sdpa sdpa_dropout slicecompile_inductor slicecompile_dropkey_inductor
         --variants default tma tma_ws --autotune 0"
      timeout "${ATTENTION_TEST_S:-180}" python3 bench/bench_attention.py $A ${ATTENTION_ARGS:-} --rounds 0 \
        --csv "$out/attention_checks.csv" > "$out/bench_attention_checks.log" 2>&1 || true &
      wait
      budget=$(( ${ATTENTION_DEADLINE_S:-460} - (SECONDS - start) ))
      python3 bench/bench_attention.py $A --modes fwd_kernels full_kernels full --rounds 2 \
        --budget-s $(( budget > 60 ? budget : 60 )) --csv "$out/attention_variants.csv" \
        bench/results/attention_variants.csv ${ATTENTION_ARGS:-} 2>&1 | tee "$out/bench_attention.log" \
        | grep -E "^\[|budget|failed" || true
      for log in "$out"/pytest_gpu_attention_*.log; do [ -f "$log" ] && echo "== $log" && tail -4 "$log"; done
      [ -f "$out/inspect_kernels.log" ] && echo "== inspect_kernels: $(grep -c . "$out/inspect_kernels.log") lines"
      echo "== $out/bench_attention_checks.log"
      grep -E "check .*(wrong|failed)|note|checks ok" "$out/bench_attention_checks.log" | tail -20
      echo "== $out/bench_attention.log"
      grep -E "skipped|budget|failed|note" "$out/bench_attention.log" | tail -20
      sed -n '/^Summary/,$p' "$out/bench_attention.log" ;;
    probe)
      # The attention kernels' candidates: each checked at a small shape on both read paths, beside the
      # attention kernel and op tests on each path, then each timed at the benchmark's shapes.
      for tma in 0 1; do
        log="$out/pytest_gpu_attention_tma$tma.log"
        { env SLICECOMPILE_ATTENTION_TMA=$tma TORCHINDUCTOR_AUTOGRAD_CACHE=0 TORCHINDUCTOR_FX_GRAPH_CACHE=0 \
            timeout "${ATTENTION_TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider \
            tests/kernels/test_attention_kernels.py tests/ops/test_dropout_attention.py > "$log" 2>&1
          echo "exit status $? (124: stopped after ${ATTENTION_TEST_S:-150} s)" >> "$log"; } &
      done
      timeout "${ATTENTION_TEST_S:-150}" python3 bench/probe_attention_configs.py --length 512 > "$out/probe_checks.log" 2>&1 &
      wait
      P="--time --paths ptr tma --shapes 8,12,1024,64 4,16,2048,128 16,12,512,64 2,32,4096,128"
      P="$P --csv bench/results/attention_configs.csv"
      timeout "${PROBE_S:-300}" python3 bench/probe_attention_configs.py $P 2>&1 | tee "$out/probe_times.log" \
        | sed -n '/^Summary/,$p'
      timeout "${PROBE_DROPKEY_S:-60}" python3 bench/probe_attention_configs.py $P --policy dropkey --first 2>&1 \
        | tee "$out/probe_times_dropkey.log" | sed -n '/^Summary/,$p'
      for tma in 0 1; do echo "== tests, TMA $tma"; tail -3 "$out/pytest_gpu_attention_tma$tma.log"; done
      echo "== probe checks: $(grep -c ' ok ' "$out/probe_checks.log") ok"; grep -E "WRONG|FAILED" "$out/probe_checks.log" | head ;;
    lora)
      python3 bench/bench_lora.py 2>&1 | tee "$out/bench_lora.log" ;;
    gpt2)
      python3 bench/bench_gpt2_block.py --p 0.1 0.5 --steps 30 --backends eager inductor slicecompile \
        slicecompile-input slicecompile-output 2>&1 | tee "$out/bench_gpt2_block.log"
      python3 bench/bench_gpt2_block.py --p 0.5 --steps 30 --backends inductor slicecompile slicecompile-output \
        --cudagraphs 2>&1 | tee "$out/bench_gpt2_block_cudagraphs.log"
      python3 bench/bench_gpt2_block.py --model hf --p 0.1 0.5 --steps 30 --backends inductor slicecompile 2>&1 \
        | tee "$out/bench_gpt2_block_hf.log" ;;
    encoder)
      python3 bench/bench_encoder.py --steps 50 2>&1 | tee "$out/bench_encoder.log" ;;
    slice)
      S="--shapes 8192,4096,4096 8192,16384,4096 16384,4096,16384 4096,1024,4096"
      python3 bench/bench_dropout_linear.py $S --p 0.5 --providers dropout_eager limit slicecompile slicecompile_slice \
        --csv dropout_linear_slice.csv 2>&1 | tee "$out/bench_slice.log"
      python3 bench/bench_dropout_linear.py --shapes 8192,4096,4096 16384,4096,16384 --p 0.5 0.1 \
        --providers dropout_eager limit slicecompile --csv dropout_linear_compact.csv 2>&1 | tee "$out/bench_compact.log" ;;
    memory)
      (cd bench && python3 bench_memory.py --p 0.1 0.5) 2>&1 | tee "$out/bench_memory.log" ;;
    wrn)
      (cd bench && python3 bench_wrn_block.py --p 0.3 0.5) 2>&1 | tee "$out/bench_wrn_block_default.log"
      (cd bench && python3 bench_wrn_block.py --p 0.3 0.5 --cudagraphs --variants inductor "slicecompile block" \
        "slicecompile slice") 2>&1 | tee "$out/bench_wrn_block_cudagraphs.log" ;;
    distributed)
      (cd bench && python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" bench_distributed.py \
        --steps 60 --warmup 15) 2>&1 | tee "$out/bench_distributed.log" ;;
    verdicts)
      python3 bench/bench_verdicts.py 2>&1 | tee "$out/bench_verdicts.log" ;;
    hashed)
      python3 bench/bench_hashed_outputs.py --device cuda --dtype bfloat16 --active 0.05 0.1 0.25 \
        --shapes 16384,768,50304 8192,1024,128256 4096,128,670091 2>&1 | tee "$out/bench_hashed_outputs.log" ;;
    frontier)
      python3 bench/bench_frontier.py --budget 15 --p 0.1 0.3 0.5 2>&1 | tee "$out/bench_frontier.log"
      python3 bench/bench_lm_step.py 2>&1 | tee "$out/bench_lm_step.log" ;;
  esac
done
find bench/results -maxdepth 1 -name "*.csv" -newer "$out/gpu.txt" -exec cp {} "$out/" \; 2>/dev/null || true  # the CSVs this run wrote
