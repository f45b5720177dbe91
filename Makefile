# dflockd Swift client: build, test and demo entry points.
#   make setup   Debian packages (only if missing) + .venv with the dflockd test server
#   make build   swift build (debug)
#   make test    setup, then swift test (unit tests + tests against a real dflockd)
#   make demo    setup, then run the Demo example against a real dflockd on a free port
#   make example NAME=Quickstart   setup, then run one example against a throwaway dflockd
#   make examples                  setup, then run every example, each with its own dflockd
#   make docs    DocC documentation of the library; any documentation warning fails it
#   make bench   release build of dflockd-bench, then it and the Python client (async API) on one
#                real dflockd: one table of throughput, p50, p99, client CPU per op and ratios
#   make bench-holders   dflockd-bench holding 15,000 locks for 60 s on one loop thread
#   make clean   remove build products (.build); `make distclean` also removes .venv

SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)

BENCH_WORKERS ?= 100
BENCH_ROUNDS ?= 500
BENCH_REPEAT ?= 3
BENCH_HOLDERS ?= 15000
BENCH_HOLD_SECONDS ?= 60
BENCH_LEASE ?= 10

.PHONY: setup build test demo example examples docs bench bench-build bench-holders clean distclean

setup:
	@bash Tests/scripts/setup

build:
	$(SWIFT) build

# Serial: many tests measure a timeout against a real server, and parallel suites on a 2-core
# machine starve the 2-thread cooperative pool that resumes them, which makes timings lie.
test: setup
	$(SWIFT) test --no-parallel

demo: setup
	$(SWIFT) build --product Demo
	bash Tests/scripts/with-server --append-port-arg -- "$$($(SWIFT) build --show-bin-path)/Demo"

# Every program in Examples/. LockLost waits for the server to drop a silent connection, so it
# gets a server with a 3-second read timeout instead of the default 23 s.
EXAMPLES = Quickstart Callbacks TwoPhase LockLost Sharding Semaphore Embedded EmbeddedServer Demo
server_flags = $(if $(filter LockLost,$(1)),--read-timeout 3)

example: setup
	@test -n "$(NAME)" || { echo "usage: make example NAME=<one of: $(EXAMPLES)>" >&2; exit 2; }
	$(SWIFT) build --product $(NAME)
	bash Tests/scripts/with-server $(call server_flags,$(NAME)) --append-port-arg -- "$$($(SWIFT) build --show-bin-path)/$(NAME)"

examples: setup
	$(SWIFT) build
	@bin="$$($(SWIFT) build --show-bin-path)"; set -e; for name in $(EXAMPLES); do \
		printf '\n== %s\n' "$$name"; \
		flags=; [ "$$name" = LockLost ] && flags="--read-timeout 3"; \
		bash Tests/scripts/with-server $$flags --append-port-arg -- "$$bin/$$name"; \
	done

# The archive lands in .build/plugins/Swift-DocC/outputs/DflockdClient.doccarchive
# (swift-docc-plugin; the catalog is Sources/DflockdClient/DflockdClient.docc).
docs:
	$(SWIFT) package generate-documentation --target DflockdClient --warnings-as-errors

bench-build:
	$(SWIFT) build -c release --product dflockd-bench

bench: setup bench-build
	bash Tests/scripts/with-server --max-locks 100000 -- .venv/bin/python Benchmarks/compare.py \
		--bench "$$($(SWIFT) build -c release --show-bin-path)/dflockd-bench" \
		--workers $(BENCH_WORKERS) --rounds $(BENCH_ROUNDS) --lease $(BENCH_LEASE) --repeat $(BENCH_REPEAT)

# One socket per held lock: the server and the client each need ulimit -n above BENCH_HOLDERS.
bench-holders: setup bench-build
	@echo "ulimit -n: $$(ulimit -n) (soft), $$(ulimit -Hn) (hard); $(BENCH_HOLDERS) holders need one socket each"
	bash Tests/scripts/with-server --max-locks 20000 -- bash -c 'start=$$SECONDS; \
		"$$0" --servers "127.0.0.1:$$DFLOCKD_PORT" --holders $(BENCH_HOLDERS) --hold-seconds $(BENCH_HOLD_SECONDS) --lease $(BENCH_LEASE); \
		status=$$?; \
		echo "  server, whole run   : $$(grep -c " cmd=n " "$$DFLOCKD_SERVER_LOG") renew requests in its log;" \
			"$$(awk -v t=$$(getconf CLK_TCK) "{ printf \"%.1f\", (\$$14 + \$$15) / t }" /proc/$$DFLOCKD_SERVER_PID/stat) s CPU in $$((SECONDS - start)) s;" \
			"load average $$(cut -d" " -f1-3 /proc/loadavg)"; \
		exit $$status' "$$($(SWIFT) build -c release --show-bin-path)/dflockd-bench"

clean:
	rm -rf .build

distclean: clean
	rm -rf .venv
