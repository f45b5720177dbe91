# dflockd Swift client: build, test and demo entry points.
#   make setup   Debian packages (only if missing) + .venv with the dflockd test server
#   make build   swift build (debug)
#   make test    setup, then swift test (unit tests + tests against a real dflockd)
#   make demo    setup, then run the Demo example against a real dflockd on a free port
#   make clean   remove build products (.build); `make distclean` also removes .venv

SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)

.PHONY: setup build test demo clean distclean

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

clean:
	rm -rf .build

distclean: clean
	rm -rf .venv
