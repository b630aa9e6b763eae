.PHONY: test soak lint format demo bench

test:
	python -m pytest

soak:  # the long hypothesis profile
	HYPOTHESIS_PROFILE=soak python -m pytest

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

demo:
	python -m slicecompile demo

bench:  # needs a CUDA GPU
	python bench/bench_dropout_linear.py --shapes 8192,4096,4096 --p 0 0.5
