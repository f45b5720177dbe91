# dflockd Swift client: build, test and demo entry points.
#   make setup   Debian packages (only if missing) + .venv with the dflockd test server
#   make build   swift build (debug)
#   make test    setup, then swift test (unit tests + tests against a real dflockd)
#   make demo    setup, then run the Demo example against a real dflockd on a free port
#   make example NAME=Quickstart   setup, then run one example against a throwaway dflockd
#   make examples                  setup, then run every example, each with its own dflockd
#   make docs    DocC documentation of the library; any documentation warning fails it
#   make clean   remove build products (.build); `make distclean` also removes .venv

SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)

.PHONY: setup build test demo example examples docs clean distclean

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

clean:
	rm -rf .build

distclean: clean
	rm -rf .venv
