# make demo: the whole experiment on the generated shapes data (creates .venv on first use)
# make test: the test suite
# make notebooks: the guided-tour notebooks executed into notebooks/executed/*.ipynb (not committed)
# make test-avx2: the precision- and kernel-sensitive tests again as on a CPU without native bfloat16 (AVX2 only)
# make test-variations: the tests that train (pytest -m trains) under 3 seeds x (2 threads, 1 thread, AVX2, SSE kernels),
#   every thresholded statistic printed beside its threshold (tests/variations.py: 12 pytest runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# Stand-in for a CPU with AVX2 only (no AVX-512, no native bf16): ATen's kernels, oneDNN and MKL limited to AVX2.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
# Tests whose numbers depend on the CPU's kernels (bf16 against fp32, ours against torchvision) or on the precision
# chosen for the CPU
KERNEL_SENSITIVE := tests/test_bf16.py tests/test_precision.py tests/test_torchvision_parity.py tests/test_bench.py \
	tests/test_train.py::test_the_run_prints_and_keeps_its_precision \
	tests/test_evaluation.py::test_evaluation_is_fp32_unless_asked

.PHONY: demo test test-avx2 test-variations venv clean notebooks

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps imagecorruptions
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) experiment.py --overwrite

test: venv $(VENV)/.installed-test
	$(PY) -m pytest tests -q

test-avx2: venv $(VENV)/.installed-test
	$(AVX2) $(PY) -m pytest $(KERNEL_SENSITIVE) -q

test-variations: venv $(VENV)/.installed-test
	$(PY) tests/variations.py

notebooks: venv $(VENV)/.installed-test
	$(PY) notebooks/render.py --out notebooks/executed

clean:
	rm -rf runs datasets
