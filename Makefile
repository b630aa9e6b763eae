.PHONY: test soak lint format demo bench tune

test:
	python -m pytest

soak:  # the long hypothesis profile, with each property's example count
	HYPOTHESIS_PROFILE=soak python -m pytest -q --hypothesis-show-statistics

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

demo:
	python -m slicecompile demo

bench:  # needs a CUDA GPU; bench/README.md has the full set of commands
	python bench/bench_dropout_linear.py --shapes 8192,4096,4096 8192,16384,4096 16384,4096,16384 4096,1024,4096 \
		--p 0 0.1 0.25 0.5 0.75 --providers dense dropout_eager limit slicecompile
	python bench/plot_dropout_linear.py --dtype bfloat16 --mode full_kernels

tune:  # needs a CUDA GPU
	python -m slicecompile tune --shapes 8192,4096,4096 --p 0.5
