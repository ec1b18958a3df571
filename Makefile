# The README's two commands: `make run` and `make test`.
# Both set up what they need on a fresh machine (a virtualenv in .venv with
# the versions in requirements/lock.txt, node `ws` and socket.io for the demo
# and test backends) and are safe to run again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow test-latest setup lock lock-upgrade conformance conformance-full bench bench-smoke check clean

setup: $(STAMP) tests/node/node_modules/.installed $(VENV)/.system-deps

# Debian packages the tests use: node/npm for the seed's `ws` backend,
# headless Chromium for the dashboard test, systemd-analyze to verify the
# unit file, HAProxy as the L4 balancer in front of the fleet test,
# Prometheus (with promtool) for the fleet's rules and scraping test, nginx,
# side by side with lbws in front of the real applications
# (tests/test_real_apps.py), and curl for the HTTPS test with curl's
# defaults. Installed only when missing.
$(VENV)/.system-deps: | $(STAMP)
	@missing=""; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	touch $@

# Every dependency, runtime and test, from the lock with its hashes: the
# versions the suite passed with. lbws itself is installed on top of them
# without resolving anything again.
$(STAMP): setup.cfg pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps --config-settings editable_mode=compat -e .
	touch $@

tests/node/node_modules/.installed: tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --loglevel=error
	touch $@

# lbws on 127.0.0.1:8020 (dashboard on :8021) in front of two node `ws`
# echo backends on :8010 and :8011, as in etc/lbws.ini. Ctrl-C stops all.
run: setup
	@trap 'kill $$(jobs -p) 2>/dev/null' EXIT INT TERM; \
	node tests/node/echo-server.js --port 8010 --prefix "echo1: " & \
	node tests/node/echo-server.js --port 8011 --prefix "echo2: " & \
	$(BIN)/twistd -n --pidfile= lbws --config etc/lbws.ini

# Which releases of the libraries lbws leans on a run used, for its log.
VERSIONS := -c 'from importlib.metadata import version; \
	print("versions:", ", ".join(n + " " + version(n) for n in ("Twisted", "autobahn", "pyOpenSSL")))'

test: setup
	@$(BIN)/python $(VERSIONS)
	$(BIN)/python -m pytest -q

# The suite with the newest releases setup.cfg allows, ignoring the lock:
# what `pip install lbws` gives a user today, and the check before raising a
# bound in setup.cfg or running `make lock-upgrade`. Its own virtualenv, so
# .venv keeps the locked versions.
LATEST := .venv-latest
test-latest: tests/node/node_modules/.installed $(VENV)/.system-deps
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager \
		--config-settings editable_mode=compat -e '.[test]'
	@$(LATEST)/bin/python $(VERSIONS)
	$(LATEST)/bin/python -m pytest -q

# requirements/lock.txt (runtime and test) and requirements/runtime.txt (the
# same versions, runtime only, for deploy/Containerfile), with the hashes of
# every file of each release, for CPython and PyPy 3.11 and later on any
# platform. `make lock` resolves what setup.cfg asks for and keeps every pin
# it still allows: run it after changing setup.cfg's requirements.
# `make lock-upgrade` moves every pin to the newest release setup.cfg allows:
# run it after `make test-latest` passes. The resolver (uv) lives in its own
# virtualenv and reads no pip or uv configuration of the machine, so the
# hashes are the package index's own.
TOOLS := .venv-tools
UV_VERSION := 0.13.8
LOCK := $(TOOLS)/bin/uv pip compile setup.cfg --quiet --universal --python-version 3.11 \
	--generate-hashes --no-config --custom-compile-command 'make lock'

$(TOOLS)/.uv-$(UV_VERSION):
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)
	touch $@

lock: $(TOOLS)/.uv-$(UV_VERSION)
	$(LOCK) $(UPGRADE) --extra test -o requirements/lock.txt
	$(LOCK) -c requirements/lock.txt -o requirements/runtime.txt

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

# The long fault and load tests (5,000 idle clients, a 30 s message storm).
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

check: setup
	$(BIN)/twistd -n lbws --config etc/lbws.ini --check

# Cases 1-10 and a subset of the permessage-deflate groups 12-13 (CI);
# conformance-full runs every case of 12-13 too (much slower).
conformance: setup
	bash tests/conformance/setup.sh
	$(BIN)/python tests/conformance/run.py

conformance-full: setup
	bash tests/conformance/setup.sh
	$(BIN)/python tests/conformance/run.py --full --timeout 7200

bench: setup
	bash bench/setup.sh
	$(BIN)/python bench/run.py

bench-smoke: setup
	bash bench/setup.sh
	$(BIN)/python bench/run.py --smoke

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) tests/node/node_modules reports build *.egg-info
