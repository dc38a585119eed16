# covey: every install step lives here, so a fresh machine (and CI) needs only `make`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Debian packages the tests need: chromium renders audit reports; mosquitto is the MQTT
# broker the context-capture tests start. SQLCipher itself comes with the sqlcipher3 wheel: Debian's sqlcipher 3.4
# cannot read the SQLCipher 4 format. libtcmalloc-minimal4 is the allocator of the fast
# simulation engine's worker processes (training there is ~18 % faster than on glibc's).
DEB_PACKAGES := chromium mosquitto libtcmalloc-minimal4
PACKAGES := covey device models privacy aggregator protocols simulations tests
# hnswlib compiles from source; a -march=native build cached by pip could crash elsewhere.
export HNSWLIB_NO_NATIVE := 1

.PHONY: setup system demo test test-fast lint typecheck bench clean

setup: system $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

system:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup
	$(BIN)/covey demo

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES)

# mypy cannot follow setuptools' package-dir mapping, so it reads a symlinked tree.
typecheck: $(STAMP)
	@rm -rf build/typecheck && mkdir -p build/typecheck/covey
	@for f in covey/*.py; do ln -s ../../../$$f build/typecheck/covey/; done
	@for d in device models privacy aggregator protocols simulations; do \
	  ln -s ../../../$$d build/typecheck/covey/$$d; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p covey

test: setup lint typecheck
	$(BIN)/pytest

# The quick loop while developing: no slow integration tests.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" -x -q

bench: setup
	$(BIN)/python -m covey.simulations.bench

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
