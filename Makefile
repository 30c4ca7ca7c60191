# Build the book (website + PDF) and test the package. Every target installs what it needs.
#   make pdf    -> _build/html/index.html and _build/pdf/build-llm-from-scratch.pdf
#   make test   -> pytest on the package
SHELL := /bin/bash
.DEFAULT_GOAL := pdf

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JB     := $(BIN)/jupyter-book
PDF    := _build/pdf/build-llm-from-scratch.pdf
SOURCES := _config.yml _toc.yml $(shell find book code -type f \( -name '*.md' -o -name '*.py' -o -name '*.bib' -o -name '*.css' -o -name '*.js' -o -name '*.txt' \) -not -path '*/_build/*' -not -path 'book/_static/mathjax/*' 2>/dev/null)
JB_FLAGS := --all -W -n --keep-going
# Kernel settings for the book (SVG figures): book/_ipython/profile_default.
export IPYTHONDIR := $(CURDIR)/book/_ipython
# What the chapters train and download (the tiny model, its tokenizer) lives in _build, so a
# clean build trains from scratch and a change to code/ retrains.
export BUILDLLM_CACHE := $(CURDIR)/_build/cache

.PHONY: setup html pdf test bench serve clean check-pdf mutate

# ---- setup: idempotent; stamps make a second run free --------------------------------
setup: $(VENV)/.stamp node_modules/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python >= 3.10" >&2; exit 1; }
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else echo "make: Python's venv module is missing (apt-get install python3-venv)" >&2; exit 1; fi; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,book,bench]'
	touch $@

node_modules/.stamp: package.json package-lock.json
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nodejs npm; \
	  else echo "make: node and npm are needed for the PDF's math (apt-get install nodejs npm)" >&2; exit 1; fi; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# System libraries WeasyPrint needs (Pango) and fonts for CJK and emoji the book's fonts lack;
# installed with apt only when missing and root.
.PHONY: syslibs
syslibs:
	@if ! ldconfig -p | grep -q libpangoft2-1.0 || ! fc-list | grep -q Symbola || ! fc-list | grep -q DroidSansFallback; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libpango-1.0-0 libpangoft2-1.0-0 fontconfig fonts-dejavu-core fonts-droid-fallback fonts-symbola; \
	  else echo "make: the PDF needs Pango and fallback fonts (apt-get install libpangoft2-1.0-0 fonts-dejavu-core fonts-droid-fallback fonts-symbola)" >&2; exit 1; fi; fi

# ---- book -----------------------------------------------------------------------------
# The execution cache keys on cell source only: clear it whenever the package changes, or
# the benchmark results that Appendix B reads.
RESULTS := $(wildcard benchmarks/results/*.json)
_build/.code-hash: setup $(shell find code -name '*.py' 2>/dev/null) $(RESULTS)
	@mkdir -p _build
	@new=$$(find code benchmarks/results \( -name '*.py' -o -name '*.json' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); \
	if [ "$$(cat $@ 2>/dev/null)" != "$$new" ]; then \
	  echo "code/ or benchmark results changed: clearing the execution cache"; rm -rf _build/.jupyter_cache _build/cache; echo $$new > $@; fi

book/_static/mathjax/tex-svg.js: node_modules/.stamp
	rm -rf book/_static/mathjax && mkdir -p book/_static/mathjax
	cp -r node_modules/mathjax-full/es5/. book/_static/mathjax/

_build/html/.stamp: $(VENV)/.stamp _build/.code-hash book/_static/mathjax/tex-svg.js $(SOURCES)
	$(JB) build . $(JB_FLAGS)
	touch $@

html: _build/html/.stamp
	@echo "website: _build/html/index.html"

$(PDF): _build/html/.stamp node_modules/.stamp book/pdf/make_pdf.py book/pdf/print.css book/pdf/tex2svg.js | syslibs
	$(BIN)/python book/pdf/make_pdf.py _build/html $(PDF)
	install -m 644 $(PDF) _build/html/book/  # beside the pages; world-readable to serve

pdf: $(PDF)
	@echo "website: _build/html/index.html"
	@echo "PDF:     $(PDF)"

serve: html
	@echo "serving http://127.0.0.1:8000 (Ctrl-C stops)"
	$(BIN)/python -m http.server --bind 127.0.0.1 --directory _build/html 8000

# ---- tests and benchmarks ----------------------------------------------------------------
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not book" -q -n 2

# Chromium for the checks that drive the site in a browser (tests/test_book.py); installed
# with apt only when missing and root.
.PHONY: browser
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "make: the site's checks need Chromium (apt-get install chromium)" >&2; exit 1; fi; fi

check-pdf: pdf browser
	$(BIN)/python -m pytest -m book -q tests/test_book.py

# Each named mutant of the orchestration (tests/mutants.py) must fail a test.
mutate: setup
	$(BIN)/python tests/mutants.py

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build book/_static/mathjax .pytest_cache
