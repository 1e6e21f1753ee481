# Everything a newcomer needs: `make demo` and `make test`. Both create .venv
# and install the project with its test extra the first time.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench soak lint test-flask-matrix test-flask-oldest clean

$(STAMP): setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

soak: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/run.py --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Flask minors we support, each tested in its own venv with the Werkzeug it
# was released with. `make test-flask-matrix` runs them all; CI runs the
# oldest (the newest is what `make test` uses).
FLASK_MATRIX := 2.3 3.0 3.1
FLASK_OLDEST := 2.3
werkzeug_for = $(if $(filter 2.3,$(1)),werkzeug==2.3.*,$(if $(filter 3.0,$(1)),werkzeug==3.0.*,werkzeug))

.venv-flask-%/.installed: setup.cfg setup.py
	test -x .venv-flask-$*/bin/python || $(PYTHON) -m venv .venv-flask-$*
	.venv-flask-$*/bin/python -m pip install --quiet -e '.[test]' 'flask==$*.*' '$(call werkzeug_for,$*)'
	touch $@

.PRECIOUS: .venv-flask-%/.installed
test-flask-%: .venv-flask-%/.installed
	.venv-flask-$*/bin/python -c "from importlib.metadata import version as v; print('Flask', v('flask'), 'Werkzeug', v('werkzeug'))"
	.venv-flask-$*/bin/python -m pytest -q -m "not slow"

test-flask-matrix: $(foreach v,$(FLASK_MATRIX),test-flask-$(v))

test-flask-oldest: test-flask-$(FLASK_OLDEST)
