# Two commands (README.md): `make run` and `make test`. Everything else is a convenience.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
# The standalone product: every optional part (setup.cfg extras) plus the test tools.
EXTRAS := mllp,sql,sentry,server,test
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# honcho hands PORT to the first process (web); the others get PORT+100.
# The routing file: ./courier.yml if you made one, else the runnable example.
export PORT ?= 8000
export COURIER_CONFIG ?= $(if $(wildcard courier.yml),courier.yml,examples/courier.yml)

.PHONY: run hospital test install migrate bench paging chaos cluster cluster-chaos clean install-systemd

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

migrate: install
	courier db upgrade

# honcho stops every process when one exits, so the one-shot `release` (migrate) runs first. Flower needs a
# credential: FLOWER_BASIC_AUTH if you set one, else one made once in instance/flower-auth (printed at start).
run: export FLOWER_AUTH_FILE ?= instance/flower-auth
run: migrate
	honcho start -f Procfile web worker relay beat mllp flower

# The hospital scenario (examples/hospital.yml, README tour): start `python3 examples/hospital_sinks.py`
# in another terminal first. Its own store (instance/hospital.db), and the MLLP listener for the HL7 feed;
# erp and inventory get keyed pseudonyms, so COURIER_PSEUDONYM_KEY must be set (and kept): the check says so.
hospital: export COURIER_CONFIG := examples/hospital.yml
hospital: export DATABASE_URL ?= sqlite:///instance/hospital.db
hospital: migrate
	courier config check
	honcho start -f Procfile web worker relay mllp

# bandit first: any finding fails the run unless its line says `# nosec BXXX  # why` ([tool.bandit] in pyproject.toml).
test: install
	$(VENV)/bin/bandit -c pyproject.toml -r app tasks adapters courier migrations -q
	pytest

# Benchmarks print numbers; they assert nothing (see bench/run.py). py-spy is for the profile only,
# so it is installed here, not in setup.cfg. `make bench BENCH_ARGS=--quick` checks the harness in
# about 2 minutes; `make bench BENCH_ARGS="--duration 300"` is the run for the record. Needs wrk (Debian).
BENCH_ARGS ?=
bench: install
	@command -v wrk >/dev/null || { echo "make bench needs wrk, the HTTP load client: apt-get install wrk" >&2; exit 1; }
	$(VENV)/bin/pip install --quiet py-spy
	python bench/run.py $(BENCH_ARGS)
	python bench/bulkhead.py

# API paging at ten million messages (bench/paging.py, results in bench/PAGING.md): a scratch database in the
# local PostgreSQL, seeded and indexed in about 3.5 minutes, each filter's first and 101st page timed; dropped after.
PAGING_ARGS ?=
paging: install
	python bench/paging.py $(PAGING_ARGS)

# The failure suite (bench/chaos.py): its own PostgreSQL cluster and RabbitMQ node on other ports, Courier's
# real processes under load, one fault after another (kill -9, restarts, a destination down, disk full), and
# a reconciliation after each; exits 1 if anything acknowledged was lost. About 7 minutes; CHAOS_ARGS=--quick
# runs the short version that `make test` runs (tests/test_chaos.py).
CHAOS_ARGS ?=
chaos: install
	python bench/chaos.py $(CHAOS_ARGS)

# Scale-out on one machine (docs/scaling.md): three RabbitMQ nodes in one cluster, a PostgreSQL primary with a
# synchronous standby, two Courier nodes (web, mllp, relay, worker each), all on their own ports and data
# folders; prints the addresses and writes instance/cluster.env; Ctrl-C stops and removes it all.
# COURIER_CONFIG routes, as for `make run`. CLUSTER_ARGS=--async-standby for an asynchronous standby.
CLUSTER_ARGS ?=
cluster: install
	python bench/cluster.py $(CLUSTER_ARGS)

# Node failures under load on that set-up (bench/cluster_chaos.py): a RabbitMQ node killed, a whole Courier
# node killed, the PostgreSQL primary crashed and the standby promoted; reconciled after each, exit 1 if
# anything acknowledged was lost; writes bench/CLUSTER.md. CLUSTER_CHAOS_ARGS=--quick: what .ci/run runs (~1.5 min).
CLUSTER_CHAOS_ARGS ?=
cluster-chaos: install
	python bench/cluster_chaos.py $(CLUSTER_CHAOS_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache .hypothesis

# systemd units for a single-VM install (docs/install.md), run from the checkout the processes are to run in:
# `sudo make install-systemd PREFIX=/etc/systemd/system`. SYSTEMD_ARGS: more options (--user, --env-file).
PREFIX ?= /etc/systemd/system
SYSTEMD_ARGS ?=
install-systemd: install
	courier install systemd --prefix $(PREFIX) --app-dir $(CURDIR) --venv $(CURDIR)/$(VENV) $(SYSTEMD_ARGS)
