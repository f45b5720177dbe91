import Logging
import Synchronization

/// Many locks over a few shared connections: a ``DistributedLock`` or ``DistributedSemaphore``
/// created with `session:` sends its requests on connections the session shares among all its
/// locks, instead of a connection of its own.
///
/// ```swift
/// let session = try LockSession(servers: [("127.0.0.1", 6388)])
/// let lock = try DistributedLock(key: "job-42", session: session)
/// try await lock.withLock { … }
/// session.close()
/// ```
///
/// A dflockd connection may hold any number of locks, and renewals and releases name the key
/// and token: 100,000 locks held through one connection cost one socket, a few hundred bytes
/// each, and a renewal costs a share of a write instead of a write and a read of its own.
///
/// What changes for a lock placed on a session:
/// - **Acquire** first tries the key on its shared connection without blocking (`l key 0`,
///   `sl` for a semaphore). When the key is taken and `acquireTimeoutS > 0`, the lock waits on
///   a connection of its own, as without a session, and stays on it until released.
///   `enqueue` likewise: a free key is taken on the shared connection (`.acquired`);
///   otherwise the lock enqueues and waits on a connection of its own.
/// - **Renewals** go on the shared connection; whatever falls due in one turn of the loop
///   leaves in one write, and replies are read in bulk. Each lock keeps its own local lease
///   deadline and renews by its `renewRatio` alone; the session keeps a connection with a held
///   lock from going silent (every 5 s it checks, and one held lock renews early when the
///   connection has been quiet that long), well inside the servers' 23-second read timeout.
/// - **Isolation:** a request refused for one lock (a refused renewal, a release of a lost
///   token, `error_max_locks` on a try) affects that lock alone. Only a failure of the
///   connection itself (end of stream, reset, a missed deadline, a malformed reply) ends it, and
///   then **every lock held through it is lost** (`onLockLost` once each, in the same turn of
///   the loop). The next acquire opens a new connection.
/// - **``DistributedLease/close()``** cannot close a shared connection for one lock: it sends
///   the lock's release without waiting for the answer and stops its renewals; the key is free
///   on the server within one round trip. A held lock dropped without a release is released
///   the same way.
/// - ``close()`` closes every lock of the session like `close()` (no `onLockLost`), then the
///   connections once what was sent on them is answered. Later calls on its locks fail with
///   ``LockError/sessionClosed``.
///
/// A failed connect fails the calls that waited for it with the reason, and for a short
/// back-off (100 ms doubling up to 5 s, with jitter) further calls fail at once with it; the
/// next call after that tries again.
public final class LockSession: @unchecked Sendable {
    /// The loop the session's connections and locks run on.
    public let loop: EventLoop

    let endpoints: [Endpoint]
    let shardingStrategy: ShardingStrategy
    let connectionsPerServer: Int
    /// For the connections a lock opens for itself (a blocking wait).
    let ownConfiguration: Connection.Configuration
    private let sharedConfiguration: Connection.Configuration
    let logger: Logger
    private let metrics: DflockdMetrics
    /// How often an open shared connection is checked for silence: one silent this long has
    /// one of its locks renew at once, so the connection is never silent for twice this
    /// (``DistributedLease/defaultMaxIdleMs``: well under the servers' 23-second read timeout),
    /// whatever the leases. Its locks renew by their `renewRatio` alone. Loop-confined; tests
    /// shorten it.
    var idleCheckMs = DistributedLease.defaultMaxIdleMs / 2
    /// The lease timers of every lock on the session, on one libuv timer. Loop-confined.
    let leaseTimers: TickTimers<LeaseDriver>
    /// Run and graceful shutdown under swift-service-lifecycle (LockSession+Service.swift).
    let lifecycle = SessionLifecycle()

    /// Spreads the locks of one server over its connections, in turn. Any thread.
    private let placements = Atomic<UInt64>(0)
    /// Every lock placed on the session, for ``close()``, at the index the lock was given when
    /// it registered. Any thread.
    private let registry = ThreadLock(Registry())
    private let isClosed = Atomic<Bool>(false)

    // Loop-confined. Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds: they were a tenth of a request's instructions (callgrind), only
    // the loop thread touches them, and debug builds, which the tests run, check every access.
    private var channels: [Channel]
    /// The locks attached to a shared connection, each at the slot its member names. Slots, not
    /// a dictionary: at 100,000 locks a dictionary's table has 262,144 buckets (it grows at
    /// three quarters full), which cost 84 bytes a lock here.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var members: [MemberEntry] = []
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var freeMembers: [UInt32] = []
    private var random = SystemRandomNumberGenerator()

    /// One shared connection slot: its machine and, while one exists, its connection.
    private final class Channel {
        let endpoint: Endpoint
        #if !DEBUG
        @exclusivity(unchecked)
        #endif
        var machine = SharedConnectionMachine()
        var connection: Connection?
        var observer: ChannelObserver?
        /// Why the last connection failed, until the next one opens (a reconnect).
        var lastFailure: String?
        /// Checks, while the connection is open, that it does not stay silent.
        var idleGuard: LoopTimer?

        init(endpoint: Endpoint) { self.endpoint = endpoint }
    }

    private struct MemberEntry {
        /// Not kept alive by the session: a driver detaches before it goes.
        unowned(unsafe) var lease: LeaseDriver?
        /// The lock's session the member serves now (or served last, between acquisitions).
        var session: LeaseMachine.Session
        /// Odd while the slot is in use, and the high half of its member's `raw` then; it moves
        /// on when the slot is freed, so that a stale member finds nothing.
        var generation: UInt32
        var channel: UInt32
    }

    /// The drivers of the locks placed on the session, `nil` in a free slot. A handle
    /// unregisters its driver as it goes, before the driver can go, so a driver read under the
    /// registry's lock is alive; the registry does not keep it alive, nor refer to it weakly
    /// (see ``LeaseDriver``).
    struct Registry {
        private var drivers: [Entry] = []
        private var free: [UInt32] = []

        private struct Entry {
            unowned(unsafe) var driver: LeaseDriver?
        }

        mutating func insert(_ driver: LeaseDriver) -> UInt32 {
            if let index = free.popLast() {
                drivers[Int(index)].driver = driver
                return index
            }
            drivers.append(Entry(driver: driver))
            return UInt32(drivers.count - 1)
        }

        mutating func remove(_ index: UInt32) {
            drivers[Int(index)].driver = nil
            free.append(index)
        }

        var all: [LeaseDriver] { drivers.compactMap(\.driver) }
    }

    /// Creates a session. Nothing touches the network until a lock on it acquires.
    ///
    /// - Parameters:
    ///   - servers: `(host, port)` pairs; each key lives on the one `shardingStrategy` picks.
    ///     Default `[("127.0.0.1", 6388)]`.
    ///   - shardingStrategy: Maps `(key, servers.count)` to a server index.
    ///   - connectionsPerServer: Shared connections to each server (at least 1); the locks of a
    ///     server are spread over them in turn, as they are created.
    ///   - tls: TLS options for every connection; `TLSOptions()` verifies against the system
    ///     CAs.
    ///   - auth: The servers' `--auth-token`, sent first on every connection.
    ///   - connectTimeoutMs: Limit on connecting (TCP and, with `tls`, the handshake).
    ///   - socketTimeoutMs: Close a connection when no byte arrives for this long while a reply
    ///     is awaited. On a shared connection that ends it for every lock on it.
    ///   - loop: The loop that runs the session and its locks.
    ///   - logger: Where the session and its shared connections log: a shared connection
    ///     lost (and the locks lost with it) at `warning`, connect failures and back-off at
    ///     `info`, graceful shutdown at `notice`, the rest at `debug`/`trace`. The default logs
    ///     nothing.
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the first invalid option.
    public init(servers: [(String, Int)]? = nil,
                shardingStrategy: @escaping ShardingStrategy = stableHashShard,
                connectionsPerServer: Int = 1,
                tls: TLSOptions? = nil,
                auth: String? = nil,
                connectTimeoutMs: Int? = nil,
                socketTimeoutMs: Int? = nil,
                loop: EventLoop = .shared,
                logger: Logger = .disabled) throws(LockError) {
        let servers = servers ?? [("127.0.0.1", 6388)]
        guard !servers.isEmpty else {
            throw .invalidArgument(name: "servers", reason: "must name at least one (host, port)")
        }
        for (host, port) in servers {
            try Connection.validate(host: host, port: port)
        }
        guard (1...1024).contains(connectionsPerServer) else {
            throw .invalidArgument(name: "connectionsPerServer", reason: "must be 1...1024, got \(connectionsPerServer)")
        }
        let configuration = try ConnectionOptions(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs,
                                                  socketTimeoutMs: socketTimeoutMs, logger: logger).validated()
        self.loop = loop
        self.logger = logger
        self.metrics = configuration.metrics ?? .current
        self.endpoints = servers.map { Endpoint(host: $0.0, port: $0.1) }
        self.shardingStrategy = shardingStrategy
        self.connectionsPerServer = connectionsPerServer
        self.ownConfiguration = configuration
        var shared = configuration
        shared.gathersWrites = true
        self.sharedConfiguration = shared
        self.leaseTimers = TickTimers(loop: loop)
        self.channels = endpoints.flatMap { endpoint in (0..<connectionsPerServer).map { _ in Channel(endpoint: endpoint) } }
    }

    deinit {
        let connections = channels.compactMap(\.connection)
        let timers = UncheckedSendable((leaseTimers, channels.compactMap(\.idleGuard)))
        loop.runOnLoop {
            for connection in connections { connection.closeWhenAnswered() }
            timers.value.0.close()
            for idleGuard in timers.value.1 { idleGuard.close() }
        }
    }

    /// Closes every lock of the session as ``DistributedLease/close()`` does (held keys are
    /// released without waiting for the answer; no `onLockLost`; calls in flight fail with
    /// ``LockError/closed``), then each connection once what was sent on it is answered.
    /// Later calls on the session's locks fail with ``LockError/sessionClosed``. Idempotent;
    /// safe from any thread.
    public func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // `run()` returns once the locks are closed (or the loop is gone).
        loop.runOnLoop(ifShutDown: { [lifecycle] in lifecycle.markClosed() }) { [self] in
            // The registry has the locks whose handles exist; the members also have those
            // dropped with a call still in flight, which run until it completes.
            var closing = placedLeases
            let registered = Set(closing.map(ObjectIdentifier.init))
            closing += members.compactMap(\.lease).filter { !registered.contains(ObjectIdentifier($0)) }
            for lease in closing { lease.closeForSession() }
            for index in channels.indices { perform(channels[index].machine.handle(.closeRequested), on: index) }
            lifecycle.markClosed()
        }
    }

    // MARK: - Placement (any thread)

    /// The shared connection a new lock on `key` uses, and its server.
    func place(key: String) throws(LockError) -> (channel: Int, endpoint: Endpoint) {
        let server = shardingStrategy(key, endpoints.count)
        guard endpoints.indices.contains(server) else {
            throw .invalidArgument(name: "shardingStrategy", reason: "returned \(server) for \(endpoints.count) servers; it must return 0..<\(endpoints.count)")
        }
        let turn = Int(placements.wrappingAdd(1, ordering: .relaxed).oldValue % UInt64(connectionsPerServer))
        return (server * connectionsPerServer + turn, endpoints[server])
    }

    /// Places a lock's driver in the registry; the index unregisters it. Any thread.
    func register(_ driver: LeaseDriver) -> UInt32 {
        registry.withLock { $0.insert(driver) }
    }

    /// The drivers of every lock placed on the session whose handle still exists. Any thread.
    var placedLeases: [LeaseDriver] {
        registry.withLock(\.all)
    }

    func unregister(_ index: UInt32) {
        registry.withLock { $0.remove(index) }
    }

    // MARK: - The locks' side (loop thread)

    /// `lease` wants channel `channel` for its session `session`: it hears
    /// `sharedConnectionReady` or `sharedConnectionFailed`, never inside this call's caller's
    /// own call (the lease queues events that arrive while it performs actions).
    func attach(_ lease: LeaseDriver, session: LeaseMachine.Session, channel: Int) -> SharedConnectionMachine.Member {
        loop.assertInLoop()
        let index: Int
        if let free = freeMembers.popLast() {
            index = Int(free)
            members[index].generation &+= 1
            members[index].lease = lease
            members[index].session = session
            members[index].channel = UInt32(channel)
        } else {
            index = members.count
            members.append(MemberEntry(lease: lease, session: session, generation: 1, channel: UInt32(channel)))
        }
        let member = SharedConnectionMachine.Member(raw: UInt64(members[index].generation) << 32 | UInt64(index))
        perform(channels[channel].machine.handle(.attachRequested(member, nowMs: loop.nowMs)), on: channel)
        return member
    }

    /// `lease`'s member `member` serves its new `session`, if it is still on the open
    /// connection: that connection, ready now; `nil` when the member must attach anew (the
    /// connection it was on has ended).
    func reattach(_ member: SharedConnectionMachine.Member, session: LeaseMachine.Session) -> Connection? {
        loop.assertInLoop()
        guard let index = slot(of: member) else { return nil }
        let channel = Int(members[index].channel)
        guard case .open = channels[channel].machine.phase, channels[channel].machine.attached.contains(member),
              let connection = channels[channel].connection else { return nil }
        members[index].session = session
        return connection
    }

    func detach(_ member: SharedConnectionMachine.Member) {
        guard let entry = removeMember(member) else { return }
        perform(channels[Int(entry.channel)].machine.handle(.detachRequested(member)), on: Int(entry.channel))
    }

    /// The slot of a member still attached.
    private func slot(of member: SharedConnectionMachine.Member) -> Int? {
        let index = Int(truncatingIfNeeded: member.raw & 0xFFFF_FFFF)
        guard members.indices.contains(index), UInt64(members[index].generation) == member.raw >> 32 else { return nil }
        return index
    }

    private func entry(of member: SharedConnectionMachine.Member) -> MemberEntry? {
        slot(of: member).map { members[$0] }
    }

    private func removeMember(_ member: SharedConnectionMachine.Member) -> MemberEntry? {
        guard let index = slot(of: member) else { return nil }
        let entry = members[index]
        members[index].generation &+= 1
        members[index].lease = nil
        freeMembers.append(UInt32(index))
        return entry
    }

    /// Sends `request` on the channel's open connection, whose answer nobody waits for (a
    /// release of a closed, dropped or lost lock). With no open connection there is nothing
    /// to release: what was held on it went with it.
    func sendUnanswered(_ request: Request, channel: Int) {
        guard case .open = channels[channel].machine.phase, let connection = channels[channel].connection else { return }
        connection.send(request) { _ in }
    }

    // MARK: - Performing the channel machine's actions

    private func perform(_ actions: [SharedConnectionMachine.Action], on index: Int) {
        for action in actions {
            switch action {
            case .open(let generation):
                if let reason = channels[index].lastFailure {
                    channels[index].lastFailure = nil
                    metrics.reconnects.increment()
                    logger.info("reconnecting shared connection", metadata: [
                        LogField.server: .string(channels[index].endpoint.description), LogField.reason: .string(reason)])
                }
                open(index, generation: generation)
            case .admit(let admitted):
                guard let connection = channels[index].connection else { continue }
                startIdleGuard(index)
                for member in admitted {
                    guard let entry = entry(of: member) else { continue }
                    entry.lease?.sharedConnectionReady(entry.session, connection: connection)
                }
            case .reject(let rejected, let error):
                if !rejected.isEmpty, error != .sessionClosed {
                    logger.info("shared connection unavailable; backing off", metadata: [
                        LogField.server: .string(channels[index].endpoint.description), LogField.reason: .string(Redaction.error(error)),
                        "dflockd.calls_failed": .stringConvertible(rejected.count)])
                }
                for member in rejected {
                    guard let entry = removeMember(member) else { continue }
                    entry.lease?.sharedConnectionFailed(entry.session, error: error)
                }
            case .lost(let lost, let error):
                // Members include locks between acquisitions, which lose nothing.
                let held = lost.filter { member in
                    entry(of: member).map { entry in entry.lease?.holdsOnSharedConnection(in: entry.session) ?? false } ?? false
                }
                if !held.isEmpty {
                    logger.warning("shared connection lost with the locks held on it", metadata: [
                        LogField.server: .string(channels[index].endpoint.description), LogField.reason: .string(Redaction.error(error)),
                        "dflockd.locks_lost": .stringConvertible(held.count),
                        "dflockd.keys": .string(held.prefix(20).compactMap { entry(of: $0)?.lease?.key }.joined(separator: ","))])
                }
                for member in lost {
                    guard let entry = removeMember(member) else { continue }
                    entry.lease?.sharedConnectionFailed(entry.session, error: error)
                }
            case .closeWhenAnswered:
                let channel = channels[index]
                stopIdleGuard(index)
                channel.observer = nil
                channel.connection?.closeWhenAnswered()
                channel.connection = nil
            }
        }
    }

    // MARK: - The idle guard

    private func startIdleGuard(_ index: Int) {
        guard channels[index].idleGuard == nil else { return }
        let timer = LoopTimer(loop: loop) { [weak self] in self?.checkIdle(index) }
        channels[index].idleGuard = timer
        timer.schedule(afterMilliseconds: idleCheckMs)
    }

    private func stopIdleGuard(_ index: Int) {
        channels[index].idleGuard?.close()
        channels[index].idleGuard = nil
    }

    /// An open connection silent for `idleCheckMs` has one lock that holds through it renew
    /// now; with none held, silence is harmless (the server frees nothing).
    private func checkIdle(_ index: Int) {
        let channel = channels[index]
        guard case .open = channel.machine.phase, let connection = channel.connection else {
            stopIdleGuard(index)
            return
        }
        if loop.nowMs &- connection.lastWriteMs >= UInt64(idleCheckMs) {
            for member in channel.machine.attached {
                if let lease = entry(of: member)?.lease, lease.renewForSilentConnection() { break }
            }
        }
        channel.idleGuard?.schedule(afterMilliseconds: idleCheckMs)
    }

    private func open(_ index: Int, generation: SharedConnectionMachine.Generation) {
        let channel = channels[index]
        let connection = Connection(endpoint: channel.endpoint, configuration: sharedConfiguration, loop: loop)
        let observer = ChannelObserver(session: self, channel: index, generation: generation)
        connection.delegate = observer
        channel.connection = connection
        channel.observer = observer
        connection.connect { [weak self] result in
            guard let self else { return }
            switch result {
            case .success: perform(channels[index].machine.handle(.connected(generation)), on: index)
            case .failure(let error): channelEnded(index, generation: generation, error: error)
            }
        }
    }

    fileprivate func channelEnded(_ index: Int, generation: SharedConnectionMachine.Generation, error: LockError) {
        let channel = channels[index]
        channel.lastFailure = Redaction.error(error)
        let actions = channel.machine.handle(.ended(generation, error, nowMs: loop.nowMs, random: random.next()))
        if channel.machine.generation == generation, channel.observer?.generation == generation {
            channel.connection = nil
            channel.observer = nil
        }
        perform(actions, on: index)
    }
}

/// The delegate of one generation of a shared connection: reports its end.
private final class ChannelObserver: ConnectionDelegate {
    weak var session: LockSession?
    let channel: Int
    let generation: SharedConnectionMachine.Generation

    init(session: LockSession, channel: Int, generation: SharedConnectionMachine.Generation) {
        self.session = session
        self.channel = channel
        self.generation = generation
    }

    func connection(_ connection: Connection, didCloseWith error: LockError) {
        session?.channelEnded(channel, generation: generation, error: error)
    }
}
