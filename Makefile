# Everything a newcomer needs: `make demo` and `make test`. `make demo`
# creates .venv with only what the demo needs (the flask extra); `make test`
# adds the test extra. Every dependency installs as a binary wheel: no C
# compiler or Python headers are needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PIP_INSTALL = -m pip install --quiet --prefer-binary

# A venv is kept only if its pip runs: one whose creation failed half-way
# (no pip) is removed and made again, never reused.
venv_for = $(1)/bin/python -m pip --version >/dev/null 2>&1 || { rm -rf $(1) && $(PYTHON) -m venv $(1); }

.PHONY: demo test docs bench soak lint test-gevent-suite test-flask-suite test-werkzeug-suite test-django-suite test-flask-matrix test-flask-oldest test-flask-main clean

# A stamp is written only after its install succeeded: a failed run is
# retried in full next time.
$(STAMP): setup.cfg setup.py
	$(call venv_for,$(VENV))
	$(PY) $(PIP_INSTALL) -e '.[test]'
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): setup.cfg setup.py
	$(call venv_for,$(VENV))
	$(PY) $(PIP_INSTALL) -e '.[flask]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Flask's own test suite, plain and with GeventContext on every app: any
# test that passes plain and fails with the extension fails this target.
test-flask-suite: $(STAMP)
	$(PY) peers/flask_suite.py --python $(PY)

# Werkzeug's own form-parser and request-body tests (from the sdist of the
# installed Werkzeug), plain and with every body read through geventctx's
# shared body: any test that passes plain and fails with it, or a run in
# which no read went through it, fails this target. A few seconds.
test-werkzeug-suite: $(STAMP)
	$(PY) peers/werkzeug_suite.py --python $(PY)

# Django's own test suite (from the sdist of the installed Django; the labels
# that touch requests, handlers, signals, transactions, uploads, i18n, cache,
# middleware, backends), plain and with geventctx.django's handler and
# request class: any test that passes plain and fails with them fails this
# target. About a minute per run.
test-django-suite: $(STAMP)
	$(PY) peers/django_suite.py --python $(PY)

# gevent's own tests (they ship in its wheel) with geventctx's Pool, Group and
# ThreadPool substituted, and with patch() on, next to a plain baseline.
test-gevent-suite: $(STAMP)
	$(PY) peers/gevent_suite.py

# The distributions are built into build/lint-dist and checked as PyPI would
# render and accept them.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	rm -rf build/lint-dist
	$(PY) -m build --outdir build/lint-dist . >/dev/null
	$(PY) -m twine check --strict build/lint-dist/*

# The Sphinx site (docs/), warnings as errors; the docs extra is installed
# into .venv next to the test extra (autodoc imports every adapter).
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): setup.cfg setup.py $(STAMP)
	$(PY) $(PIP_INSTALL) -e '.[test,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

soak: $(STAMP)
	$(PY) -m pytest -q -m slow

# Exits 1 if a budget is missed; `make bench BENCH_FLAGS=--no-fail` lists the
# misses and exits 0 (for exploring; --quick for a smoke run).
BENCH_FLAGS ?=
# P4's load comes from wrk (Debian package), installed here when missing if
# apt-get can; without it the benchmark uses its own gevent client.
bench: $(STAMP)
	command -v wrk >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk)) \
		>/dev/null 2>&1; } || echo "wrk not installed: P4 uses the gevent client"
	$(PY) benchmarks/run.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) .venv-flask-* build dist docs/_build *.egg-info .pytest_cache .cache

# Flask minors we support, each tested in its own venv with the Werkzeug it
# was released with. `make test-flask-matrix` runs them all; CI runs the
# oldest (the newest is what `make test` uses).
FLASK_MATRIX := 2.3 3.0 3.1
FLASK_OLDEST := 2.3
werkzeug_for = $(if $(filter 2.3,$(1)),werkzeug==2.3.*,$(if $(filter 3.0,$(1)),werkzeug==3.0.*,werkzeug))

# The oldest minor is tested at the floors setup.cfg declares, all four at
# once, and from the sdist: it is built, unpacked into build/sdist-tree and
# installed from there (not editable), and the suite runs inside the unpacked
# tree. One run proves the floors and that the sdist carries its own tests.
# FLOORS must equal setup.cfg's lowest versions (tests/test_packaging.py
# checks). gunicorn 24 and later ask for gevent >= 24.10.1 (27 refuses to
# start its gevent worker below), so this venv has the newest gunicorn that
# takes gevent 23.9: the floor is ours, gunicorn's is gunicorn's.
FLOORS := gevent==23.9.0 greenlet==2.0.0.post0 werkzeug==2.3.3 flask==2.3.2
FLOORS_ALSO := gunicorn==23.0.0
SDIST_TREE := build/sdist-tree
OLDEST_VENV := .venv-flask-$(FLASK_OLDEST)

SOURCES := setup.cfg setup.py pyproject.toml MANIFEST.in LICENSE README.rst CHANGES.rst \
	$(wildcard docs/*.rst docs/*.py) \
	$(wildcard geventctx/* geventctx/*/*.py tests/*.py examples/* benchmarks/*.py peers/*.py)

$(SDIST_TREE)/.unpacked: $(SOURCES) | $(STAMP)
	rm -rf build/sdist $(SDIST_TREE)
	$(PY) -m build --sdist --outdir build/sdist . >/dev/null
	mkdir -p $(SDIST_TREE)
	tar xzf build/sdist/geventctx-*.tar.gz -C $(SDIST_TREE) --strip-components=1
	touch $@

$(OLDEST_VENV)/.installed: $(SDIST_TREE)/.unpacked Makefile
	$(call venv_for,$(OLDEST_VENV))
	$(OLDEST_VENV)/bin/python $(PIP_INSTALL) './$(SDIST_TREE)[test]' $(FLOORS) $(FLOORS_ALSO)
	$(OLDEST_VENV)/bin/python $(PIP_INSTALL) --force-reinstall --no-deps ./$(SDIST_TREE)
	touch $@

test-flask-$(FLASK_OLDEST): $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "from importlib.metadata import version as v; print(*(f'{n} {v(n)}' for n in ('gevent', 'greenlet', 'werkzeug', 'flask')))"
	cd $(SDIST_TREE) && $(CURDIR)/$(OLDEST_VENV)/bin/python -m pytest -q -m "not slow"

.venv-flask-%/.installed: setup.cfg setup.py
	$(call venv_for,.venv-flask-$*)
	.venv-flask-$*/bin/python $(PIP_INSTALL) -e '.[test]' 'flask==$*.*' '$(call werkzeug_for,$*)'
	touch $@

.PRECIOUS: .venv-flask-%/.installed
test-flask-%: .venv-flask-%/.installed
	.venv-flask-$*/bin/python -c "from importlib.metadata import version as v; print('Flask', v('flask'), 'Werkzeug', v('werkzeug'))"
	.venv-flask-$*/bin/python -m pytest -q -m "not slow"

# (exit status 2: that minor's suite does not collect here; not a failure)
test-flask-suite-%: .venv-flask-%/.installed
	$(PY) peers/flask_suite.py --python .venv-flask-$*/bin/python || test $$? -eq 2

test-flask-matrix: $(foreach v,$(FLASK_MATRIX),test-flask-$(v) test-flask-suite-$(v))

test-flask-oldest: test-flask-$(FLASK_OLDEST)

# Flask's next release: our suite against Flask main (and Werkzeug as given).
# FLASK_MAIN is a pip requirement, for instance a local snapshot:
#   make test-flask-main FLASK_MAIN=git+file:///path/to/flask
FLASK_MAIN    ?= git+https://github.com/pallets/flask
WERKZEUG_MAIN ?= werkzeug

test-flask-main: $(STAMP)
	$(call venv_for,.venv-flask-main)
	.venv-flask-main/bin/python $(PIP_INSTALL) -e '.[test]' '$(WERKZEUG_MAIN)'
	.venv-flask-main/bin/python -m pip install --quiet --force-reinstall --no-deps '$(FLASK_MAIN)'
	.venv-flask-main/bin/python -c "from importlib.metadata import version as v; print('Flask', v('flask'), 'Werkzeug', v('werkzeug'))"
	.venv-flask-main/bin/python -m pytest -q -m "not slow"
