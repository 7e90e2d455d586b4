# One entry point for setup, tests and the demo. Every target creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test test-fast lint demo docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q

# The inner loop: everything but the end-to-end checks marked slow (CI runs `make test`, all of them).
test-fast: lint
	$(VENV)/bin/pytest -q -m "not slow"

# The documentation site, built offline into site/ in strict mode: a dead link or a page left out of the nav fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# CPU demo: CM + OC on the bundled digits (IR 10), then the per-split evaluation of theta and theta^g. The demo
# writes over its own demo_output/ when run again.
demo: install
	$(PY) train_unet_cm.py --config configs/demo_digits.yaml --overwrite_output_dir
	$(VENV)/bin/capman-eval --pipeline demo_output --expert both --num_images_per_class 50 --steps 25 \
		--output_dir demo_output/eval
