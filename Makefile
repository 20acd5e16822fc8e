# Two commands for a fresh clone:  make demo  |  make test
# Each creates .venv if missing, installs torch (pinned CPU build, first) and the project, then runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.layerzip-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray,onnx]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layerzip demo

# The report test renders report.html in headless Chromium; `browser` installs it from Debian (best effort here).
test: $(STAMP)
	-@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory browser
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

browser:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
		&& echo "chromium installed" || echo "chromium could not be installed; the browser test will be skipped"; \
	else echo "not root or no apt-get: install chromium yourself to run the browser test"; fi

# Real-model benchmarks (minutes to hours on a CPU): see bench/README.md
bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/prepare.py
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
