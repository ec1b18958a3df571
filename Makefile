# The README's two commands: `make run` and `make test`.
# Both set up what they need on a fresh machine (a virtualenv in .venv,
# node `ws` and socket.io for the demo and test backends) and are safe to run
# again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow setup conformance conformance-full bench bench-smoke check clean

setup: $(STAMP) tests/node/node_modules/.installed $(VENV)/.system-deps

# Debian packages the tests use: node/npm for the seed's `ws` backend,
# headless Chromium for the dashboard test, systemd-analyze to verify the
# unit file, HAProxy as the L4 balancer in front of the fleet test, and
# Prometheus (with promtool) for the fleet's rules and scraping test, curl
# for the HTTPS test with curl's defaults. Installed only when missing.
$(VENV)/.system-deps: | $(STAMP)
	@missing=""; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	touch $@

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
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

test: setup
	$(BIN)/python -m pytest -q

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
	rm -rf $(VENV) tests/node/node_modules reports build *.egg-info
