# make install   install lotus-cli and everything its tests need into the current Python
# make test      run the test suite (tiny random checkpoints; no network, no GPU)
# make test-fast the quick tier of it (under 2 minutes on 2 cores); make lint: ruff
# make docs      the documentation site into site/ (mkdocs --strict: a broken link or anchor fails)
# make bench     speed and memory benchmark of the full-size architecture (minutes, CPU)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install system-deps lint format docs test test-fast bench clean

install: system-deps
	# the pinned CPU build first, so the loose torch>= range in pyproject is already met
	# (a bare `torch` requirement would pull a multi-GB CUDA build)
	$(PIP) install --disable-pip-version-check "torch==$(TORCH_VERSION)" || $(PIP) install --disable-pip-version-check "torch>=2.4"
	$(PIP) install --disable-pip-version-check -e ".[all,dev]"

# System libraries, from apt when it is there and we are root (CI is): libusb, which Open3D (point clouds)
# loads at import, and Chromium, the browser the tests of `lotus app` drive through Playwright (Debian's package:
# Playwright's own browser download is not needed). Elsewhere it says what to install and the tests that need
# them skip with that reason.
system-deps:
	@missing=""; \
	$(PYTHON) -c "import ctypes.util,sys; sys.exit(0 if ctypes.util.find_library('usb-1.0') else 1)" || missing=" libusb-1.0-0"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then \
		echo "system libraries present: libusb-1.0, chromium"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "apt-get install$$missing"; \
		(apt-get install -y -qq $$missing || (apt-get update -qq && apt-get install -y -qq $$missing)) >/dev/null; \
	else \
		echo "note: install$$missing (Debian/Ubuntu: apt-get install$$missing): libusb for lotus pointcloud," \
			"chromium for the browser tests of lotus app"; \
	fi

# ruff's lint and format check (the pinned version of the dev extra); `make format` rewrites the files
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# NO_MKDOCS_2_WARNING=1 silences the banner Material prints on every build about MkDocs 2, which the docs extra
# keeps out (mkdocs<2), so it would only bury the build's own warnings
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir site

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# the quick tier: everything but the tests marked heavy (Ray clusters, torchrun, several processes, long
# videos and trainings); under 2 minutes on 2 cores
test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not heavy"

bench:
	$(PYTHON) benchmarks/bench_predictor.py

clean:
	rm -rf build *.egg-info .pytest_cache site
