# make demo: the whole experiment on the generated shapes data (creates .venv on first use)
# make test: the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

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

clean:
	rm -rf runs datasets
