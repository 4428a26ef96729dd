# logbroker: every target creates .venv on first use, so a fresh machine needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SEEDS ?= 200
START ?= 0
# make sim runs the runtime simulation too, on a tenth as many seeds (make sim-runtime SEEDS=N for more)
RUNTIME_SEEDS ?= $(shell expr $(SEEDS) / 10)

.PHONY: install run test test-slow lint proto bench sim sim-runtime clean

$(STAMP): pyproject.toml client/logbroker_client/_recordcodec.c client/logbroker_client/_recordwalk.c \
		logbroker/storage/_fsyncthreads.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# kafka-python 2.0.2 for its compatibility test, on a path of its own (the venv has 3.x); best effort
	@$(BIN)/python -m pip install -q --target $(VENV)/kafka-python-2.0.2 kafka-python==2.0.2 >/dev/null 2>&1 \
		|| echo "kafka-python 2.0.2 not installed: its compatibility test will be skipped"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/logbroker dev --data-dir ./data --base-port 9092

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check logbroker client tests benchmarks
	$(BIN)/mypy logbroker client/logbroker_client benchmarks

proto: $(STAMP)
	$(BIN)/python -m logbroker_client.proto_gen

bench: $(STAMP)
	$(BIN)/python -m benchmarks.suite

sim: $(STAMP)
	$(BIN)/python -m tests.raft.sim.run --seeds $(SEEDS) --start $(START)
	$(BIN)/python -m tests.raft.sim.run --runtime --seeds $(RUNTIME_SEEDS) --start $(START)

sim-runtime: $(STAMP)
	$(BIN)/python -m tests.raft.sim.run --runtime --seeds $(SEEDS) --start $(START)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
