import DequeModule
import Logging

/// What a connection tells its owner when it ends by itself.
protocol ConnectionDelegate: AnyObject {
    /// The connection ended for a reason other than the owner's ``Connection/close()``: the
    /// server closed it, a read or write failed, a timeout hit, or a reply was malformed.
    /// Every outstanding request has already been failed with `error`.
    func connection(_ connection: Connection, didCloseWith error: LockError)
}

/// One session with one dflockd server: requests answered strictly in order.
///
/// The connection *is* the session: closing it releases whatever it holds on the server and
/// cancels its waits. Several requests may be outstanding at once (pipelining); each is
/// completed with its own reply, in the order sent.
///
/// A server's refusal (`error`, `error_…`) fails that one request, with the error its command
/// implies (``LockError/notHeld(key:)`` for a release or renewal, …), and leaves the other
/// requests and the connection alone. Only the connection's own failure ends it: end of
/// stream, a reset, a missed deadline, a reply line too long or unreadable, a refused secret.
/// Then every outstanding request fails with the reason, and the connection stays closed.
/// (dflockd 0.5.0 closes the connection after a request it calls malformed: the end of stream
/// that follows ends the connection like any other.)
///
/// Every method may be called from any thread; its completion handler is called on the loop
/// thread, never before the method has returned. The first request (or ``connect(completion:)``)
/// opens the connection, sending `auth` first when a secret is configured.
public final class Connection: @unchecked Sendable {
    /// The server this connection talks to.
    public let endpoint: Endpoint
    /// The loop that runs the connection and calls its completion handlers.
    public let loop: EventLoop

    /// Shared with the settings of the lock that opened it, not copied: about 240 bytes a
    /// connection, with 15,000 locks of a connection each.
    private let sharedConfiguration: SharedConfiguration
    var configuration: Configuration { sharedConfiguration.value }
    /// `configuration.gathersWrites`, kept apart: reading it through the configuration copied
    /// the whole value (TLS options, logger, metrics) on every write.
    private let gathersWrites: Bool
    weak var delegate: (any ConnectionDelegate)?
    /// Makes the byte stream when the connection starts: TCP unless a test or the fuzz target
    /// substitutes its own (set before the first request). Loop thread.
    var makeTransport: (EventLoop) throws(LockError) -> any Transport

    // Loop-confined. Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds: they were a tenth of a request's instructions (callgrind), only
    // the loop thread touches them, and debug builds, which the tests run, check every access.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var core: ConnectionCore<ReplyCallback>
    /// Actions of the step being performed; kept to reuse its storage.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var actions: [ConnectionCore<ReplyCallback>.Action] = []
    private var isPerforming = false
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var writeBuffer: [UInt8] = []
    private var transport: (any Transport)?
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var connectWaiters: [(Result<Void, LockError>) -> Void] = []
    /// One timer for every deadline of the connection (see ``ConnectionCore/nextDeadlineMs``).
    private var timer: LoopTimer?
    /// When the timer fires; it may fire before the next deadline, never after it.
    private var timerDueMs: UInt64?
    /// Keeps the connection alive while replies are owed or `connect` waiters wait, so every
    /// completion handler runs even if the caller dropped its reference.
    private var selfWhileBusy: Connection?
    /// What has been logged and counted of this connection's life (see ``ConnectionTelemetry``).
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var telemetry: ConnectionTelemetry
    /// A gathered flush is queued for the end of this turn.
    private var flushQueued = false
    /// Close as soon as no reply is owed (``closeWhenAnswered()``).
    private var closesWhenAnswered = false
    /// The loop time of the last write (or of the start), for a session's idle guard.
    private(set) var lastWriteMs: UInt64 = 0

    typealias Completion = (Result<Reply, LockError>) -> Void

    /// A request's completion as the core keeps it. A struct, so that the closure is stored as
    /// it is: a bare function type as the core's generic argument is stored at its most general
    /// representation, which cost a reabstraction thunk and its allocation on every request.
    struct ReplyCallback {
        let run: Completion
    }

    struct Configuration: Sendable {
        var tls: TLSOptions?
        var auth: String?
        var connectTimeoutMs: Int?
        var socketTimeoutMs: Int?
        /// The shared OpenSSL context for `tls`, looked up when the options were validated, so
        /// that connecting never waits on the context cache's lock on the loop thread.
        var tlsContext: TLSContext? = nil
        /// Send `ping` after this long without a request (dflockd 1.14 and later).
        var keepAliveMs: Int? = nil
        /// Deadline of every request that does not block on the server (and of `auth`, and of
        /// the TLS handshake when `connectTimeoutMs` is nil).
        var requestTimeoutMs: Int = Connection.defaultRequestTimeoutMs
        /// Added to a blocking request's own timeout for its deadline.
        var blockingGraceMs: Int = Connection.defaultBlockingGraceMs
        /// Where the connection logs; a lock's connections log to the lock's logger.
        var logger: Logger = .disabled
        /// The metrics set of the lock or session that made this configuration (`nil`: the one
        /// bootstrapped when the connection is made).
        var metrics: DflockdMetrics? = nil
        /// Hold writes until the end of the loop's turn, so that every request issued in one
        /// turn (by many timers, replies, or queued calls) leaves in one write: for
        /// connections shared by many locks.
        var gathersWrites = false

        var limits: ConnectionLimits {
            .init(requestTimeoutMs: requestTimeoutMs, blockingGraceMs: blockingGraceMs,
                  socketTimeoutMs: socketTimeoutMs, keepAliveMs: keepAliveMs)
        }
    }

    /// The default deadline of a request that does not block on the server: 10 s.
    public static let defaultRequestTimeoutMs = 10_000
    /// The default grace added to a blocking request's own timeout: 5 s.
    public static let defaultBlockingGraceMs = 5_000

    /// Creates a connection to one server. Nothing happens on the network until the first
    /// request or ``connect(completion:)``.
    ///
    /// No call waits forever: every request has a deadline, counted from when it is made. A
    /// blocking `acquire`, `wait` and their semaphore forms get their own timeout plus
    /// `blockingGraceMs`; every other request (a try, `acquire` with timeout 0, included),
    /// `auth`, and the TLS handshake (when `connectTimeoutMs` is nil) get `requestTimeoutMs`. A request that misses its deadline
    /// fails with ``LockError/requestTimeout(command:key:milliseconds:)`` and closes the
    /// connection (a late reply could no longer be matched to its request).
    ///
    /// - Parameters:
    ///   - host: Host name or IP literal of the server.
    ///   - port: Its TCP port.
    ///   - tls: TLS options, or `nil` for plain TCP. The files they name are read here, once
    ///     per distinct options in the process.
    ///   - auth: The server's `--auth-token`; sent as the first request when set.
    ///   - connectTimeoutMs: Limit on establishing the connection (TCP and, with `tls`, the
    ///     handshake); `nil` waits as long as TCP does for the TCP connect, and
    ///     `requestTimeoutMs` for the handshake.
    ///   - socketTimeoutMs: Close the connection when no byte arrives for this long while a
    ///     reply is owed (a blocking acquire or wait adds its own timeout to the allowance).
    ///   - keepAliveMs: Send `ping` whenever the connection has been idle (no request
    ///     outstanding) this long, so that a server's `--read-timeout` does not close it, and
    ///     the session with it. Only dflockd 1.14 and later answer `ping`; older servers answer
    ///     `error`, which is ignored, so leave it `nil` (the default) for them.
    ///   - requestTimeoutMs: The deadline of a request that does not block on the server
    ///     (default 10 s).
    ///   - blockingGraceMs: Added to a blocking request's own timeout for its deadline
    ///     (default 5 s).
    ///   - loop: The loop to run on.
    ///   - logger: Where the connection logs (swift-log): connect failures and an unasked-for
    ///     end at `info`/`notice`, connecting and closing at `debug`, each request and reply at
    ///     `trace`. The auth secret is never logged, tokens only by a prefix. The default logs
    ///     nothing.
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` for a bad port, secret or timeout,
    ///   or a TLS file that cannot be used (named as `tls.caFile`, `tls.certificateFile`, …).
    public convenience init(host: String = "127.0.0.1",
                port: Int = 6388,
                tls: TLSOptions? = nil,
                auth: String? = nil,
                connectTimeoutMs: Int? = nil,
                socketTimeoutMs: Int? = nil,
                keepAliveMs: Int? = nil,
                requestTimeoutMs: Int = Connection.defaultRequestTimeoutMs,
                blockingGraceMs: Int = Connection.defaultBlockingGraceMs,
                loop: EventLoop = .shared,
                logger: Logger = .disabled) throws(LockError) {
        try Self.validate(host: host, port: port)
        if let auth { try Validation.secret(auth) }
        // Loads the files TLS needs (once per distinct options), so a missing CA file or key is
        // reported here, naming the option.
        let tlsContext = try tls.map { options throws(LockError) in try TLSContext.shared(for: options) }
        try Self.validate(milliseconds: connectTimeoutMs, name: "connectTimeoutMs")
        try Self.validate(milliseconds: socketTimeoutMs, name: "socketTimeoutMs")
        try Self.validate(milliseconds: keepAliveMs, name: "keepAliveMs")
        try Self.validate(milliseconds: requestTimeoutMs, name: "requestTimeoutMs")
        if blockingGraceMs < 0 {
            throw .invalidArgument(name: "blockingGraceMs", reason: "must be 0 or more milliseconds, got \(blockingGraceMs)")
        }
        self.init(endpoint: Endpoint(host: host, port: port),
                  configuration: Configuration(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs,
                                               tlsContext: tlsContext, keepAliveMs: keepAliveMs,
                                               requestTimeoutMs: requestTimeoutMs, blockingGraceMs: blockingGraceMs,
                                               logger: logger),
                  loop: loop)
    }

    /// A configuration that several connections (a lock's successive ones) share.
    final class SharedConfiguration: Sendable {
        let value: Configuration
        init(_ value: Configuration) { self.value = value }
    }

    /// Creates a connection from options validated already.
    convenience init(endpoint: Endpoint, configuration: Configuration, loop: EventLoop) {
        self.init(endpoint: endpoint, sharedConfiguration: SharedConfiguration(configuration), loop: loop)
    }

    /// Creates a connection from options validated already, shared with their owner.
    init(endpoint: Endpoint, sharedConfiguration: SharedConfiguration, loop: EventLoop) {
        let configuration = sharedConfiguration.value
        self.endpoint = endpoint
        self.loop = loop
        self.sharedConfiguration = sharedConfiguration
        self.gathersWrites = configuration.gathersWrites
        telemetry = ConnectionTelemetry(endpoint: endpoint, logger: configuration.logger,
                                        metrics: configuration.metrics ?? DflockdMetrics.current)
        // Validated by the public initializers already; checked again so that no path can
        // connect without the auth it was configured with. A secret that cannot be sent fails
        // the first request.
        var auth: Request?
        var refusal: LockError?
        if let secret = configuration.auth {
            do throws(LockError) { auth = try Request.auth(secret: secret) } catch { refusal = error }
        }
        core = ConnectionCore(limits: configuration.limits, auth: auth)
        if let refusal {
            makeTransport = { _ throws(LockError) in throw refusal }
        } else {
            makeTransport = Self.transportFactory(for: configuration)
        }
    }

    deinit {
        telemetry.released()
        let identifier = ObjectIdentifier(self)
        let (loop, timer, transport) = (self.loop, self.timer, self.transport)
        guard timer != nil || transport != nil else { return }
        loop.runOnLoop {
            loop.unregister(identifier)
            timer?.close()
            transport?.close()
        }
    }

    /// Opens the connection (and authenticates, when a secret is set) if it is not open yet.
    /// The completion reports when it is ready, or why it cannot be; it runs even if the caller
    /// keeps no reference to the connection.
    public func connect(completion: @escaping (Result<Void, LockError>) -> Void) {
        loop.runOnLoop(ifShutDown: { completion(.failure(.eventLoopShutDown)) }) { [self] in
            connectWaiters.append(completion)
            step(fromCaller: true) { core, now, actions in core.connect(nowMs: now, into: &actions) }
        }
    }

    /// Closes the connection without sending anything more. Outstanding requests fail with
    /// ``LockError/closed``, on a later turn of the loop. Idempotent; safe from any thread.
    public func close() {
        loop.runOnLoop { [self] in
            step(fromCaller: true) { core, _, actions in core.close(.closed, into: &actions) }
        }
    }

    /// Closes the connection once every request sent so far is answered (at once when none is
    /// outstanding), so that requests already queued (releases) reach the server and are
    /// answered first. Loop thread only.
    func closeWhenAnswered() {
        loop.assertInLoop()
        closesWhenAnswered = true
        step(fromCaller: true) { _, _, _ in }
    }

    /// Whether the connection is closed (by the caller, the server, or a failure). Loop thread.
    var isClosed: Bool {
        if case .closed = core.phase { return true }
        return false
    }

    /// Closes the connection because the caller's task was cancelled.
    func cancel() {
        loop.runOnLoop { [self] in
            step(fromCaller: true) { core, _, actions in core.close(.cancelled, into: &actions) }
        }
    }

    /// Sends `request` and completes with its reply, on the loop thread, never before this
    /// returns. Loop thread only.
    func send(_ request: Request, completion: @escaping Completion) {
        loop.assertInLoop()
        let completion = telemetry.tracing(request, completion: completion, nowMs: loop.nowMs)
        step(fromCaller: true) { core, now, actions in core.send(request, completion: ReplyCallback(run: completion), nowMs: now, into: &actions) }
    }

    // MARK: - Driving the core

    /// Feeds one input to the core and performs the actions it returns. A step taken while
    /// another is being performed (a completion sending the next request) only adds its
    /// actions, which the outer step performs in order; writes and the timer are settled once,
    /// when the outermost step is done. The actions of a step the caller took are what must
    /// not run inside the caller's call: completions, readiness and the end go to a later turn.
    private func step(fromCaller: Bool, _ input: (inout ConnectionCore<ReplyCallback>, UInt64, inout [ConnectionCore<ReplyCallback>.Action]) -> Void) {
        let first = actions.count
        input(&core, loop.nowMs, &actions)
        if fromCaller, actions.count > first { deferCallbacks(from: first) }
        guard !isPerforming else { return }
        performQueued()
    }

    /// Performs the queued actions, including those that performing them adds, then settles
    /// writes, the timer, and whether the connection must keep itself alive.
    private func performQueued() {
        isPerforming = true
        var index = 0
        while index < actions.count {
            let action = actions[index]
            index += 1
            perform(action)
        }
        // Most steps a caller takes (a request) add no action: nothing to free then.
        if !actions.isEmpty { actions.removeAll(keepingCapacity: true) }
        if closesWhenAnswered, !core.hasOutstanding, !isClosed {
            closesWhenAnswered = false
            core.close(.closed, into: &actions)
            performQueued()
            return
        }
        flushWrites()
        settleTimer()
        let busy = core.hasOutstanding || !connectWaiters.isEmpty
        if busy != (selfWhileBusy != nil) { selfWhileBusy = busy ? self : nil }
        isPerforming = false
    }

    /// Moves the callbacks among the actions from `first` on to one later turn of the loop.
    private func deferCallbacks(from first: Int) {
        var later: [ConnectionCore<ReplyCallback>.Action] = []
        var kept = first
        for index in first..<actions.count {
            switch actions[index] {
            case .startTransport, .closeTransport:
                actions[kept] = actions[index]
                kept += 1
            case .complete, .ready, .ended:
                later.append(actions[index])
            }
        }
        actions.removeSubrange(kept...)
        guard !later.isEmpty else { return }
        loop.runLater { [self] in
            actions.append(contentsOf: later)
            if !isPerforming { performQueued() }
        }
    }

    private func perform(_ action: ConnectionCore<ReplyCallback>.Action) {
        switch action {
        case .startTransport:
            telemetry.connecting(tls: configuration.tls != nil, auth: configuration.auth != nil)
            startTransport()
        case .closeTransport:
            loop.unregister(self)
            transport?.close()
            transport = nil
        case .complete(let completion, let result):
            completion.run(result)
        case .ready:
            telemetry.ready(nowMs: loop.nowMs)
            finishConnecting(.success(()))
        case .ended(let error, let notifyOwner):
            telemetry.ended(error, byItself: notifyOwner, nowMs: loop.nowMs)
            timer?.close()
            timer = nil
            timerDueMs = nil
            finishConnecting(.failure(error))
            if notifyOwner { delegate?.connection(self, didCloseWith: error) }
        }
    }

    private func startTransport() {
        let transport: any Transport
        do throws(LockError) {
            transport = try makeTransport(loop)
        } catch {
            // Reported on a later turn, as any failure to connect.
            loop.runLater { [self] in step(fromCaller: false) { core, _, actions in core.transportFailed(error, into: &actions) } }
            return
        }
        loop.register(self)
        transport.delegate = self
        self.transport = transport
        transport.connect(to: endpoint, timeoutMilliseconds: configuration.connectTimeoutMs)
    }

    private func finishConnecting(_ result: Result<Void, LockError>) {
        guard !connectWaiters.isEmpty else { return }
        let waiters = connectWaiters
        connectWaiters.removeAll()
        for waiter in waiters { waiter(result) }
    }

    private func flushWrites() {
        guard case .open = core.phase, !core.outbound.isEmpty, transport != nil else { return }
        if gathersWrites {
            guard !flushQueued else { return }
            flushQueued = true
            loop.atEndOfTurn { [self] in
                flushQueued = false
                writeNow()
            }
            return
        }
        writeNow()
    }

    private func writeNow() {
        guard case .open = core.phase, !core.outbound.isEmpty, let transport else { return }
        // Swapped out, so that the transport's write never overlaps an access to the core.
        swap(&writeBuffer, &core.outbound)
        lastWriteMs = loop.nowMs
        writeBuffer.withUnsafeBytes { transport.write($0) }
        writeBuffer.removeAll(keepingCapacity: true)
        if core.outbound.isEmpty { swap(&writeBuffer, &core.outbound) }
    }

    /// Makes sure the timer fires no later than the core's next deadline. A timer due earlier
    /// stays as it is (firing early only recomputes), so most requests cost no timer call.
    private func settleTimer() {
        guard let next = core.nextDeadlineMs else { return }
        if let due = timerDueMs, due <= next { return }
        let timer = self.timer ?? LoopTimer(loop: loop, closedByOwner: true) { [weak self] in self?.timerFired() }
        self.timer = timer
        let now = loop.nowMs
        timer.schedule(afterMilliseconds: next > now ? Int(clamping: next - now) : 0)
        timerDueMs = next
    }

    private func timerFired() {
        timerDueMs = nil
        step(fromCaller: false) { core, now, actions in core.timerFired(nowMs: now, into: &actions) }
    }

    /// The transport the configuration asks for: TLS over TCP with `tls`, else TCP.
    static func transportFactory(for configuration: Configuration) -> (EventLoop) throws(LockError) -> any Transport {
        guard let tls = configuration.tls else { return { loop in TCPTransport(loop: loop) } }
        let cached = configuration.tlsContext
        let handshakeTimeoutMs = configuration.connectTimeoutMs == nil ? configuration.requestTimeoutMs : nil
        return { loop throws(LockError) in
            let context: TLSContext
            if let cached { context = cached } else { context = try TLSContext.shared(for: tls) }
            return TLSTransport(loop: loop, context: context, options: tls, handshakeTimeoutMilliseconds: handshakeTimeoutMs)
        }
    }

    static func validate(host: String, port: Int) throws(LockError) {
        if host.isEmpty || host.utf8.contains(where: { $0 <= 0x20 }) {
            throw .invalidArgument(name: "host", reason: "must be a host name or IP address without whitespace, got \(host.debugDescription)")
        }
        if !(1...65535).contains(port) {
            throw .invalidArgument(name: "port", reason: "must be 1...65535, got \(port)")
        }
    }

    static func validate(milliseconds: Int?, name: String) throws(LockError) {
        if let milliseconds, milliseconds < 1 {
            throw .invalidArgument(name: name, reason: "must be at least 1 millisecond (nil means no limit), got \(milliseconds)")
        }
    }
}

extension Connection: LoopResource {
    func closeForShutdown() {
        step(fromCaller: true) { core, _, actions in core.close(.eventLoopShutDown, notifyOwner: true, into: &actions) }
    }
}

extension Connection: TransportDelegate {
    func transportDidConnect(_ transport: any Transport) {
        step(fromCaller: false) { core, now, actions in core.transportConnected(nowMs: now, into: &actions) }
    }

    func transport(_ transport: any Transport, didRead bytes: UnsafeRawBufferPointer) {
        step(fromCaller: false) { core, now, actions in core.received(bytes, nowMs: now, into: &actions) }
    }

    func transport(_ transport: any Transport, didFailWith error: LockError) {
        step(fromCaller: false) { core, _, actions in core.transportFailed(error, into: &actions) }
    }
}

// The configuration holds the auth secret: its text forms and its mirror (`dump`, debuggers)
// show everything but that.
extension Connection.Configuration: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    var description: String {
        "Configuration(tls: \(tls.map { "\($0)" } ?? "nil"), auth: \(auth == nil ? "nil" : "<redacted>"), connectTimeoutMs: \(connectTimeoutMs.map(String.init) ?? "nil"), socketTimeoutMs: \(socketTimeoutMs.map(String.init) ?? "nil"), keepAliveMs: \(keepAliveMs.map(String.init) ?? "nil"), requestTimeoutMs: \(requestTimeoutMs), blockingGraceMs: \(blockingGraceMs))"
    }

    var debugDescription: String { description }

    var customMirror: Mirror {
        Mirror(self, children: ["tls": tls as Any, "auth": (auth == nil ? nil : "<redacted>") as String? as Any,
                                "connectTimeoutMs": connectTimeoutMs as Any, "socketTimeoutMs": socketTimeoutMs as Any,
                                "keepAliveMs": keepAliveMs as Any, "requestTimeoutMs": requestTimeoutMs,
                                "blockingGraceMs": blockingGraceMs],
               displayStyle: .struct)
    }
}
