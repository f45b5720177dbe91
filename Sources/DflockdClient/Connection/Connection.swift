import DequeModule

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
/// completed with its own reply, in the order sent. Any failure or end of the stream fails every
/// outstanding request with the reason, and the connection stays closed.
///
/// Every method may be called from any thread; its completion handler is called on the loop
/// thread, never before the method has returned. The first request (or ``connect(completion:)``)
/// opens the connection, sending `auth` first when a secret is configured.
public final class Connection: @unchecked Sendable {
    /// The server this connection talks to.
    public let endpoint: Endpoint
    /// The loop that runs the connection and calls its completion handlers.
    public let loop: EventLoop

    let configuration: Configuration
    weak var delegate: (any ConnectionDelegate)?
    /// Makes the byte stream when the connection starts: TCP unless a test or the fuzz target
    /// substitutes its own (set before the first request). Loop thread.
    var makeTransport: (EventLoop) -> any Transport = { TCPTransport(loop: $0) }

    // Loop-confined state.
    private var phase = Phase.idle
    private var transport: (any Transport)?
    private var framer = LineFramer()
    private var outstanding = Deque<Outstanding>()
    private var unsent: [UInt8] = []
    private var connectWaiters: [(Result<Void, LockError>) -> Void] = []
    private var replyTimer: LoopTimer?
    private var keepAliveTimer: LoopTimer?
    /// Keeps the connection alive while replies are owed, so every completion handler runs even
    /// if the caller dropped its reference.
    private var selfWhileBusy: Connection?
    /// Whether `auth` (when configured) has been answered `ok`: only then is the connection ready.
    private var isAuthenticated = false
    /// True while replies from one read are being delivered; writes then gather in
    /// `writtenWhileDelivering` and go out together at the end of the read.
    private var isDelivering = false
    private var writtenWhileDelivering: [UInt8] = []

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
    }

    private enum Phase {
        case idle, connecting, open
        case closed(LockError)
    }

    private struct Outstanding {
        let request: Request
        let completion: (Result<Reply, LockError>) -> Void
    }

    /// Creates a connection to one server. Nothing happens on the network until the first
    /// request or ``connect(completion:)``.
    ///
    /// - Parameters:
    ///   - host: Host name or IP literal of the server.
    ///   - port: Its TCP port.
    ///   - tls: TLS options, or `nil` for plain TCP. The files they name are read here, once
    ///     per distinct options in the process.
    ///   - auth: The server's `--auth-token`; sent as the first request when set.
    ///   - connectTimeoutMs: Limit on establishing the connection (TCP and, with `tls`, the
    ///     handshake); `nil` waits as long as TCP does.
    ///   - socketTimeoutMs: Close the connection when no byte arrives for this long while a
    ///     reply is owed (a blocking acquire or wait adds its own timeout to the allowance).
    ///   - keepAliveMs: Send `ping` whenever the connection has been idle (no request
    ///     outstanding) this long, so that a server's `--read-timeout` does not close it, and
    ///     the session with it. Only dflockd 1.14 and later answer `ping`: older servers answer
    ///     `error`, so leave it `nil` (the default) for them.
    ///   - loop: The loop to run on.
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` for a bad port, secret or timeout,
    ///   or a TLS file that cannot be used (named as `tls.caFile`, `tls.certificateFile`, …).
    public convenience init(host: String = "127.0.0.1",
                port: Int = 6388,
                tls: TLSOptions? = nil,
                auth: String? = nil,
                connectTimeoutMs: Int? = nil,
                socketTimeoutMs: Int? = nil,
                keepAliveMs: Int? = nil,
                loop: EventLoop = .shared) throws(LockError) {
        try Self.validate(host: host, port: port)
        if let auth { try Validation.secret(auth) }
        // Loads the files TLS needs (once per distinct options), so a missing CA file or key is
        // reported here, naming the option.
        let tlsContext = try tls.map { options throws(LockError) in try TLSContext.shared(for: options) }
        try Self.validate(milliseconds: connectTimeoutMs, name: "connectTimeoutMs")
        try Self.validate(milliseconds: socketTimeoutMs, name: "socketTimeoutMs")
        try Self.validate(milliseconds: keepAliveMs, name: "keepAliveMs")
        self.init(endpoint: Endpoint(host: host, port: port),
                  configuration: Configuration(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs,
                                               tlsContext: tlsContext, keepAliveMs: keepAliveMs),
                  loop: loop)
    }

    /// Creates a connection from options validated already.
    init(endpoint: Endpoint, configuration: Configuration, loop: EventLoop) {
        self.endpoint = endpoint
        self.loop = loop
        self.configuration = configuration
    }

    deinit {
        let identifier = ObjectIdentifier(self)
        let (loop, timers, transport) = (self.loop, [replyTimer, keepAliveTimer], self.transport)
        loop.runOnLoop {
            loop.unregister(identifier)
            timers.forEach { $0?.close() }
            transport?.close()
        }
    }

    /// Opens the connection (and authenticates, when a secret is set) if it is not open yet.
    /// The completion reports when it is ready, or why it cannot be.
    public func connect(completion: @escaping (Result<Void, LockError>) -> Void) {
        loop.runOnLoop(ifShutDown: { completion(.failure(.eventLoopShutDown)) }) { [self] in
            switch phase {
            case .open where isAuthenticated || configuration.auth == nil:
                loop.runLater { completion(.success(())) }
            case .closed(let error):
                loop.runLater { completion(.failure(error)) }
            default:
                connectWaiters.append(completion)
                startIfIdle()
            }
        }
    }

    /// Closes the connection without sending anything more. Outstanding requests fail with
    /// ``LockError/closed``. Idempotent; safe from any thread.
    public func close() {
        loop.runOnLoop { [self] in end(with: .closed, notifyDelegate: false) }
    }

    /// Whether the connection is closed (by the caller, the server, or a failure). Loop thread.
    var isClosed: Bool {
        if case .closed = phase { return true }
        return false
    }

    /// Closes the connection because the caller's task was cancelled.
    func cancel() {
        loop.runOnLoop { [self] in end(with: .cancelled, notifyDelegate: false) }
    }

    // MARK: - Sending

    /// Sends `request` and completes with its reply, on the loop thread. Loop thread only.
    func send(_ request: Request, completion: @escaping (Result<Reply, LockError>) -> Void) {
        loop.assertInLoop()
        if case .closed(let error) = phase {
            loop.runLater { completion(.failure(error)) }
            return
        }
        startIfIdle()
        // Connecting can fail at once (inside uv_tcp_connect), closing the connection.
        if case .closed(let error) = phase {
            loop.runLater { completion(.failure(error)) }
            return
        }
        append(request, completion: completion)
    }

    private func append(_ request: Request, completion: @escaping (Result<Reply, LockError>) -> Void) {
        outstanding.append(Outstanding(request: request, completion: completion))
        if outstanding.count == 1 {
            selfWhileBusy = self
            armReplyTimer()
            keepAliveTimer?.cancel()
        }
        if case .open = phase {
            write(request)
        } else {
            request.encode(into: &unsent)
        }
    }

    private func write(_ request: Request) {
        guard let transport else { return }
        if isDelivering {
            request.encode(into: &writtenWhileDelivering)
        } else {
            request.bytes.withUnsafeBytes { transport.write($0) }
        }
    }

    private func startIfIdle() {
        guard case .idle = phase else { return }
        phase = .connecting
        loop.register(self)
        let transport: any Transport
        var authRequest: Request?
        do throws(LockError) {
            // Validated by the public initializers already; checked again so that no path can
            // connect without the auth it was configured with, or in clear instead of TLS.
            if let secret = configuration.auth { authRequest = try Request.auth(secret: secret) }
            if let tls = configuration.tls {
                let context: TLSContext
                if let cached = configuration.tlsContext {
                    context = cached
                } else {
                    context = try TLSContext.shared(for: tls)
                }
                transport = TLSTransport(loop: loop, context: context, options: tls)
            } else {
                transport = makeTransport(loop)
            }
        } catch {
            loop.runLater { [self] in end(with: error, notifyDelegate: true) }
            return
        }
        transport.delegate = self
        self.transport = transport
        if let authRequest {
            append(authRequest) { [weak self] result in self?.didAuthenticate(result) }
        }
        transport.connect(to: endpoint, timeoutMilliseconds: configuration.connectTimeoutMs)
    }

    private func didAuthenticate(_ result: Result<Reply, LockError>) {
        if case .failure(let error) = result {
            end(with: error, notifyDelegate: true)
            return
        }
        isAuthenticated = true
        finishConnecting(.success(()))
    }

    private func finishConnecting(_ result: Result<Void, LockError>) {
        let waiters = connectWaiters
        connectWaiters.removeAll()
        for waiter in waiters { waiter(result) }
    }

    // MARK: - Receiving

    private func didRead(_ bytes: UnsafeRawBufferPointer) {
        armReplyTimer()
        // Requests that completions send back while these replies are delivered (a release and
        // the next acquire, say) leave in one write when the read is done, not one write each.
        isDelivering = true
        defer {
            isDelivering = false
            if !writtenWhileDelivering.isEmpty, let transport {
                writtenWhileDelivering.withUnsafeBytes { transport.write($0) }
            }
            writtenWhileDelivering.removeAll()
        }
        do {
            try framer.feed(bytes) { line in
                deliver(line)
                if case .open = phase { return true }
                return false
            }
        } catch {
            end(with: error, notifyDelegate: true)
        }
    }

    private func deliver(_ line: UnsafeRawBufferPointer) {
        guard let next = outstanding.popFirst() else {
            let text = String(decoding: line.prefix(80), as: UTF8.self)
            end(with: .protocolViolation("a reply with no request outstanding: \(text.debugDescription)"), notifyDelegate: true)
            return
        }
        if outstanding.isEmpty {
            selfWhileBusy = nil
            armKeepAlive()
        }
        armReplyTimer()
        let result = ReplyDecoder.decode(line, for: next.request)
        if case .failure(let error) = result, !ReplyDecoder.isRecoverable(error) {
            // The server treats this request as malformed (0.5.0 closes the connection after it);
            // nothing later on this connection can be trusted.
            next.completion(result)
            end(with: error, notifyDelegate: true)
            return
        }
        next.completion(result)
    }

    /// Schedules a `ping` for when the connection will have been idle `keepAliveMs`.
    private func armKeepAlive() {
        guard let milliseconds = configuration.keepAliveMs, case .open = phase, outstanding.isEmpty else { return }
        let timer = keepAliveTimer ?? LoopTimer(loop: loop) { [weak self] in
            guard let self, case .open = phase, outstanding.isEmpty else { return }
            // An answer other than `ok` ends the connection like any malformed reply.
            send(.ping) { _ in }
        }
        keepAliveTimer = timer
        timer.schedule(afterMilliseconds: milliseconds)
    }

    private func armReplyTimer() {
        guard let milliseconds = configuration.socketTimeoutMs, case .open = phase else { return }
        guard let head = outstanding.first else {
            replyTimer?.cancel()
            return
        }
        let timer = replyTimer ?? LoopTimer(loop: loop) { [weak self] in
            self?.end(with: .socketTimeout(milliseconds: milliseconds), notifyDelegate: true)
        }
        replyTimer = timer
        // A blocking acquire or wait is silent on purpose until its own timeout.
        let blocking = (head.request.blockingSeconds ?? 0).multipliedReportingOverflow(by: 1000)
        let allowance = milliseconds.addingReportingOverflow(blocking.partialValue)
        timer.schedule(afterMilliseconds: blocking.overflow || allowance.overflow ? Int.max : allowance.partialValue)
    }

    // MARK: - Ending

    /// Closes the transport and fails everything outstanding with `error`. Idempotent.
    private func end(with error: LockError, notifyDelegate: Bool) {
        if case .closed = phase { return }
        if case .idle = phase {} else { loop.unregister(self) }
        phase = .closed(error)
        transport?.close()
        transport = nil
        replyTimer?.close()
        replyTimer = nil
        keepAliveTimer?.close()
        keepAliveTimer = nil
        unsent = []
        let failed = outstanding
        outstanding.removeAll()
        withExtendedLifetime(selfWhileBusy) {
            selfWhileBusy = nil
            for request in failed { request.completion(.failure(error)) }
            finishConnecting(.failure(error))
            if notifyDelegate { delegate?.connection(self, didCloseWith: error) }
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
        end(with: .eventLoopShutDown, notifyDelegate: true)
    }
}

extension Connection: TransportDelegate {
    func transportDidConnect(_ transport: any Transport) {
        guard case .connecting = phase else { return }
        phase = .open
        armReplyTimer()
        armKeepAlive()
        if !unsent.isEmpty {
            let bytes = unsent
            unsent = []
            bytes.withUnsafeBytes { transport.write($0) }
        }
        if configuration.auth == nil { finishConnecting(.success(())) }
    }

    func transport(_ transport: any Transport, didRead bytes: UnsafeRawBufferPointer) {
        didRead(bytes)
    }

    func transport(_ transport: any Transport, didFailWith error: LockError) {
        // A server that rejects auth may close before its `error_auth` is read.
        if case .connectionClosed = error, outstanding.first?.request.command == .auth {
            end(with: .authFailed, notifyDelegate: true)
            return
        }
        end(with: error, notifyDelegate: true)
    }
}

// The configuration holds the auth secret: its text forms and its mirror (`dump`, debuggers)
// show everything but that.
extension Connection.Configuration: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    var description: String {
        "Configuration(tls: \(tls.map { "\($0)" } ?? "nil"), auth: \(auth == nil ? "nil" : "<redacted>"), connectTimeoutMs: \(connectTimeoutMs.map(String.init) ?? "nil"), socketTimeoutMs: \(socketTimeoutMs.map(String.init) ?? "nil"), keepAliveMs: \(keepAliveMs.map(String.init) ?? "nil"))"
    }

    var debugDescription: String { description }

    var customMirror: Mirror {
        Mirror(self, children: ["tls": tls as Any, "auth": (auth == nil ? nil : "<redacted>") as String? as Any,
                                "connectTimeoutMs": connectTimeoutMs as Any, "socketTimeoutMs": socketTimeoutMs as Any,
                                "keepAliveMs": keepAliveMs as Any],
               displayStyle: .struct)
    }
}
