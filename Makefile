# dflockd Swift client: build, test and demo entry points.
#   make setup   Debian packages (only if missing) + .venv with the dflockd test server
#   make build   swift build (debug)
#   make test    setup, then swift test (unit tests + tests against a real dflockd), then a
#                smoke run of the fuzz harness over its seeds and regressions (debug replayer)
#   make fuzz    libFuzzer on the reply decoder and the connection read path (FUZZ_RUNS inputs,
#                default 1,000,000; FUZZ_SANITIZE=fuzzer for a faster run without ASan)
#   make test-asan / make test-tsan   the suite under AddressSanitizer / ThreadSanitizer
#   make demo    setup, then run the Demo example against a real dflockd on a free port
#   make clean   remove build products (.build, .build-fuzz, .build-asan, .build-tsan);
#                `make distclean` also removes .venv

SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)

FUZZ_RUNS ?= 1000000
FUZZ_SANITIZE ?= fuzzer,address
FUZZ_FLAGS ?= -max_len=4096 -print_final_stats=1
FUZZ_SCRATCH ?= .build-fuzz

.PHONY: setup build test fuzz fuzz-smoke test-asan test-tsan demo clean distclean

setup:
	@bash Tests/scripts/setup

build:
	$(SWIFT) build

test: setup
	$(SWIFT) test
	$(MAKE) --no-print-directory fuzz-smoke

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
	LSAN_OPTIONS=suppressions=$(CURDIR)/Tests/Sanitizers/lsan.supp $(SWIFT) test --sanitize=address --scratch-path .build-asan

test-tsan: setup
	$(SWIFT) test --sanitize=thread --scratch-path .build-tsan

demo: setup
	$(SWIFT) build --product Demo
	bash Tests/scripts/with-server --append-port-arg -- "$$($(SWIFT) build --show-bin-path)/Demo"

clean:
	rm -rf .build .build-fuzz .build-asan .build-tsan

distclean: clean
	rm -rf .venv
