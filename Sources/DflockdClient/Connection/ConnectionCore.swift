import DequeModule

/// The protocol logic of one ``Connection``, without I/O: a value that takes the owner's
/// requests, the transport's events, received bytes and the clock, and answers with actions
/// for its driver to perform.
///
/// Everything that decides what happens on a connection lives here: pipelining (requests are
/// answered strictly in the order sent), the auth gate (with a secret, the connection is ready
/// only when `auth` is answered `ok`), framing and reply dispatch, which failures end the
/// connection, every deadline, and keep-alive. The driver writes ``outbound``, runs the
/// actions, and schedules one timer for ``nextDeadlineMs``. Unit tests drive it without a
/// socket.
///
/// `Completion` is whatever the driver needs to finish a request (a closure in
/// ``Connection``); the core only stores and returns it.
struct ConnectionCore<Completion> {
    typealias Limits = ConnectionLimits

    enum Phase: Equatable {
        /// Nothing happened yet: the first request or `connect` starts the transport.
        case idle
        /// The transport is connecting (TCP and, with TLS, the handshake).
        case connecting
        /// The byte stream is up; requests go out as they come.
        case open
        /// Closed for good, with the reason every later request fails with.
        case closed(LockError)
    }

    enum Action {
        /// Create the transport and start connecting.
        case startTransport
        /// Close the transport (the owner's close: the transport reports nothing more).
        case closeTransport
        /// Finish one request.
        case complete(Completion, Result<Reply, LockError>)
        /// Connected (and authenticated, with a secret): `connect` waiters succeed.
        case ready
        /// The connection ended: `connect` waiters fail with the error; `notifyOwner` when it
        /// ended by itself (or by the loop's shutdown) rather than by the owner's close.
        case ended(LockError, notifyOwner: Bool)
    }

    private struct Pending {
        let request: Request
        /// nil for the core's own requests (`auth`, keep-alive `ping`).
        let completion: Completion?
        /// When this request's reply is overdue: its own deadline, or the one before it if
        /// later (a reply cannot come before the replies ahead of it), so deadlines never
        /// decrease along the queue and the head's is the next to expire.
        let deadlineMs: UInt64
        /// What the deadline allows, for the error message.
        let allowanceMs: Int
    }

    private(set) var phase = Phase.idle
    /// Encoded requests not yet handed to the transport. The driver writes them once it has
    /// performed the actions of a step, so that requests issued by completions of one read
    /// leave in one write.
    var outbound: [UInt8] = []
    private(set) var isReady = false

    private let limits: Limits
    private let auth: Request?
    private var framer = LineFramer()
    private var pending = Deque<Pending>()
    /// Loop time of the last received byte (or of the first request after a quiet spell).
    private var lastActivityMs: UInt64 = 0

    init(limits: Limits, auth: Request?) {
        self.limits = limits
        self.auth = auth
    }

    /// Whether replies are owed: the driver keeps the connection alive meanwhile.
    var hasOutstanding: Bool { !pending.isEmpty }

    // MARK: - Owner's calls

    /// Starts connecting if nothing has happened yet; `ready` follows at once when the
    /// connection is ready already, `ended` when it has closed.
    mutating func connect(nowMs: UInt64, into actions: inout [Action]) {
        switch phase {
        case .idle: start(nowMs: nowMs, into: &actions)
        case .connecting: break
        case .open: if isReady { actions.append(.ready) }
        case .closed(let error): actions.append(.ended(error, notifyOwner: false))
        }
    }

    /// Queues `request`; its completion comes back in a `complete` action.
    mutating func send(_ request: Request, completion: Completion, nowMs: UInt64, into actions: inout [Action]) {
        if case .closed(let error) = phase {
            actions.append(.complete(completion, .failure(error)))
            return
        }
        if case .idle = phase { start(nowMs: nowMs, into: &actions) }
        enqueue(request, completion: completion, nowMs: nowMs)
    }

    /// The owner closes the connection: everything outstanding fails with `reason`
    /// (``LockError/closed``, ``LockError/cancelled``, ``LockError/eventLoopShutDown``).
    mutating func close(_ reason: LockError, notifyOwner: Bool = false, into actions: inout [Action]) {
        end(reason, notifyOwner: notifyOwner, into: &actions)
    }

    // MARK: - Transport events

    mutating func transportConnected(nowMs: UInt64, into actions: inout [Action]) {
        guard case .connecting = phase else { return }
        phase = .open
        lastActivityMs = nowMs
        if auth == nil {
            isReady = true
            actions.append(.ready)
        }
    }

    mutating func transportFailed(_ error: LockError, into actions: inout [Action]) {
        // A server that rejects the secret may close before its `error_auth` is read.
        if case .connectionClosed = error, !isReady, pending.first?.request.command == .auth {
            end(.authFailed, notifyOwner: true, into: &actions)
            return
        }
        end(error, notifyOwner: true, into: &actions)
    }

    /// Bytes from the server: each complete line answers the oldest outstanding request.
    mutating func received(_ bytes: UnsafeRawBufferPointer, nowMs: UInt64, into actions: inout [Action]) {
        guard case .open = phase else { return }
        lastActivityMs = nowMs
        // The framer is moved out while it calls back into this value.
        var framer = LineFramer()
        swap(&framer, &self.framer)
        do throws(LockError) {
            try framer.feed(bytes) { line in
                deliver(line, nowMs: nowMs, into: &actions)
                return phase == .open
            }
        } catch {
            end(error, notifyOwner: true, into: &actions)
        }
        swap(&framer, &self.framer)
    }

    // MARK: - Time

    /// The loop time at which ``timerFired(nowMs:into:)`` must run next, or nil.
    var nextDeadlineMs: UInt64? {
        guard case .open = phase else {
            if case .connecting = phase { return pending.first?.deadlineMs }
            return nil
        }
        guard let head = pending.first else {
            guard let keepAliveMs = limits.keepAliveMs, isReady else { return nil }
            return lastActivityMs &+ UInt64(keepAliveMs)
        }
        guard let silence = socketDeadlineMs(head) else { return head.deadlineMs }
        return min(head.deadlineMs, silence)
    }

    mutating func timerFired(nowMs: UInt64, into actions: inout [Action]) {
        switch phase {
        case .idle, .closed:
            return
        case .connecting, .open:
            break
        }
        if let head = pending.first {
            if nowMs >= head.deadlineMs {
                end(.requestTimeout(command: head.request.command.rawValue, key: head.request.key, milliseconds: head.allowanceMs),
                    notifyOwner: true, into: &actions)
            } else if let silence = socketDeadlineMs(head), nowMs >= silence, let milliseconds = limits.socketTimeoutMs {
                end(.socketTimeout(milliseconds: milliseconds), notifyOwner: true, into: &actions)
            }
        } else if let keepAliveMs = limits.keepAliveMs, isReady, nowMs >= lastActivityMs &+ UInt64(keepAliveMs) {
            // Any answer is fine: a server that does not know `ping` says `error` and stays.
            enqueue(.ping, completion: nil, nowMs: nowMs)
        }
    }

    // MARK: - Internals

    private mutating func start(nowMs: UInt64, into actions: inout [Action]) {
        phase = .connecting
        actions.append(.startTransport)
        if let auth { enqueue(auth, completion: nil, nowMs: nowMs) }
    }

    private mutating func enqueue(_ request: Request, completion: Completion?, nowMs: UInt64) {
        let allowance: Int
        // A try (`l key 0`, `sl key 0 n`) is answered at once: it gets a plain request's
        // deadline, not a blocking one's grace (on a shared connection a try queues behind
        // every renewal written before it, and 5 s was too short for 1,000,000 locks).
        if let seconds = request.blockingSeconds, seconds > 0 {
            let blocking = seconds.multipliedReportingOverflow(by: 1000)
            let total = blocking.partialValue.addingReportingOverflow(limits.blockingGraceMs)
            allowance = blocking.overflow || total.overflow ? Int.max : total.partialValue
        } else {
            allowance = limits.requestTimeoutMs
        }
        let own = nowMs.addingReportingOverflow(UInt64(allowance))
        var deadline = own.overflow ? UInt64.max : own.partialValue
        if let last = pending.last { deadline = max(deadline, last.deadlineMs) }
        // The silence allowance counts from the first request after a quiet spell.
        if pending.isEmpty { lastActivityMs = nowMs }
        pending.append(Pending(request: request, completion: completion, deadlineMs: deadline, allowanceMs: allowance))
        request.encode(into: &outbound)
    }

    private func socketDeadlineMs(_ head: Pending) -> UInt64? {
        guard let milliseconds = limits.socketTimeoutMs else { return nil }
        let blocking = (head.request.blockingSeconds ?? 0).multipliedReportingOverflow(by: 1000)
        let allowance = milliseconds.addingReportingOverflow(blocking.partialValue)
        if blocking.overflow || allowance.overflow { return UInt64.max }
        let (deadline, overflow) = lastActivityMs.addingReportingOverflow(UInt64(allowance.partialValue))
        return overflow ? UInt64.max : deadline
    }

    private mutating func deliver(_ line: UnsafeRawBufferPointer, nowMs: UInt64, into actions: inout [Action]) {
        guard let next = pending.popFirst() else {
            let text = String(decoding: line.prefix(80), as: UTF8.self)
            end(.protocolViolation("a reply with no request outstanding: \(text.debugDescription)"), notifyOwner: true, into: &actions)
            return
        }
        // The next reply's silence allowance starts now.
        lastActivityMs = nowMs
        let result = ReplyDecoder.decode(line, for: next.request)
        guard let completion = next.completion else {
            // The core's own request: auth gates the connection, a keep-alive answer is ignored.
            if next.request.command == .auth {
                switch result {
                case .success:
                    isReady = true
                    actions.append(.ready)
                case .failure(let error):
                    end(error, notifyOwner: true, into: &actions)
                }
            }
            return
        }
        actions.append(.complete(completion, result))
        if case .failure(let error) = result, Self.endsConnection(error) {
            end(error, notifyOwner: true, into: &actions)
        }
    }

    /// Whether a failed reply ends the connection. A server's refusal (`error`, `error_…`) is
    /// that request's failure only: the stream is still in step, and the other requests and
    /// the connection go on (dflockd 0.5.0 closes the connection after a request it calls
    /// malformed; the end of stream that follows ends the connection as any does). A line this
    /// client cannot read, or a refused secret, leaves nothing later trustworthy.
    static func endsConnection(_ error: LockError) -> Bool {
        switch error {
        case .protocolViolation, .authFailed: return true
        default: return false
        }
    }

    private mutating func end(_ error: LockError, notifyOwner: Bool, into actions: inout [Action]) {
        switch phase {
        case .closed:
            return
        case .idle:
            phase = .closed(error)
        case .connecting, .open:
            phase = .closed(error)
            actions.append(.closeTransport)
        }
        outbound = []
        framer = LineFramer()
        while let entry = pending.popFirst() {
            if let completion = entry.completion { actions.append(.complete(completion, .failure(error))) }
        }
        actions.append(.ended(error, notifyOwner: notifyOwner))
    }
}

/// The deadlines and keep-alive of a connection (see ``ConnectionCore``).
struct ConnectionLimits: Sendable, Hashable {
    /// Deadline of a request that does not block on the server, counted from when it is
    /// sent (or queued while connecting).
    var requestTimeoutMs: Int
    /// Added to a blocking request's own timeout (`l`, `w`, `sl`, `sw`) for its deadline.
    var blockingGraceMs: Int
    /// Close when no byte arrives for this long while a reply is owed (a blocking head adds
    /// its own timeout); nil: no such limit.
    var socketTimeoutMs: Int?
    /// Send `ping` after this long with nothing outstanding; nil: never.
    var keepAliveMs: Int?
}
