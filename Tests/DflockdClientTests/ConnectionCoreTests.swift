// Tests of `ConnectionCore`, the connection's protocol logic, without a socket: each test feeds
// requests, transport events, bytes and times, and compares the whole list of actions.
import Testing
@testable import DflockdClient

@Suite("ConnectionCoreTests")
struct ConnectionCoreTests {
    typealias Core = ConnectionCore<Int>

    static let limits = Core.Limits(requestTimeoutMs: 10_000, blockingGraceMs: 5_000, socketTimeoutMs: nil, keepAliveMs: nil)
    static let token = "0123456789abcdef0123456789abcdef"

    /// A core and the actions of its last step, rendered as text so whole lists compare.
    struct Driver {
        var core: Core
        var now: UInt64 = 1_000

        /// The core's next deadline, `-1` for none. A plain integer: under ASan, `#expect` on a
        /// `UInt64?` comparison trips a stack-buffer-overflow report inside Swift Testing's
        /// expansion (no frame of ours), so the tests compare this instead.
        var deadline: Int64 { core.nextDeadlineMs.map { Int64($0) } ?? -1 }

        init(limits: Core.Limits = ConnectionCoreTests.limits, auth: String? = nil) {
            core = Core(limits: limits, auth: auth.map { try! Request.auth(secret: $0) })
        }

        mutating func step(_ input: (inout Core, UInt64, inout [Core.Action]) -> Void) -> [String] {
            var actions: [Core.Action] = []
            input(&core, now, &actions)
            return actions.map(Self.render)
        }

        mutating func send(_ request: Request, _ id: Int) -> [String] {
            let now = self.now
            return step { core, _, actions in core.send(request, completion: id, nowMs: now, into: &actions) }
        }

        /// The transport came up (started first, when nothing had started it).
        mutating func connected() -> [String] {
            step { core, now, actions in
                if core.phase == .idle {
                    core.connect(nowMs: now, into: &actions)
                    actions.removeAll()
                }
                core.transportConnected(nowMs: now, into: &actions)
            }
        }

        mutating func receive(_ text: String) -> [String] {
            let bytes = Array(text.utf8)
            return step { core, now, actions in
                bytes.withUnsafeBytes { core.received($0, nowMs: now, into: &actions) }
            }
        }

        mutating func fire(at time: UInt64) -> [String] {
            now = time
            return step { core, now, actions in core.timerFired(nowMs: now, into: &actions) }
        }

        /// The bytes the driver would write now, taken.
        mutating func takeOutbound() -> String {
            defer { core.outbound.removeAll() }
            return String(decoding: core.outbound, as: UTF8.self)
        }

        static func render(_ action: Core.Action) -> String {
            switch action {
            case .startTransport: return "start"
            case .closeTransport: return "closeTransport"
            case .ready: return "ready"
            case .ended(let error, let notify): return "ended(\(error), notify: \(notify))"
            case .complete(let id, .success(let reply)): return "\(id): \(reply)"
            case .complete(let id, .failure(let error)): return "\(id): \(error)"
            }
        }
    }

    static func acquire(_ key: String, _ timeoutS: Int = 0) -> Request { try! .acquire(key: key, timeoutS: timeoutS) }
    static func release(_ key: String) -> Request { try! .release(key: key, token: token) }

    @Test("requests before the connection is up go out together once it is, and replies complete them in order")
    func pipelining() {
        var driver = Driver()
        #expect(driver.send(Self.acquire("a"), 1) == ["start"])
        #expect(driver.send(Self.acquire("b"), 2) == [])
        #expect(driver.send(Self.release("c"), 3) == [])
        #expect(driver.core.phase == .connecting)
        #expect(driver.connected() == ["ready"])
        #expect(driver.takeOutbound() == "l\na\n0\nl\nb\n0\nr\nc\n\(Self.token)\n")
        #expect(driver.receive("ok \(Self.token) 33\ntimeout\nok\n") == [
            "1: granted(DflockdClient.Grant(token: \"\(Self.token)\", leaseS: 33))",
            "2: timeout",
            "3: ok",
        ])
        #expect(!driver.core.hasOutstanding)
    }

    @Test("with a secret, `auth` goes first and the connection is ready only when it is answered ok")
    func authGate() {
        var driver = Driver(auth: "s3cret")
        #expect(driver.step { core, now, actions in core.connect(nowMs: now, into: &actions) } == ["start"])
        #expect(driver.send(Self.acquire("a"), 1) == [])
        #expect(driver.connected() == [])
        #expect(driver.takeOutbound() == "auth\n_\ns3cret\nl\na\n0\n")
        #expect(driver.receive("ok\n") == ["ready"])
        #expect(driver.receive("timeout\n") == ["1: timeout"])
    }

    @Test("a refused secret fails everything pipelined behind it and ends the connection")
    func authRefused() {
        var driver = Driver(auth: "s3cret")
        _ = driver.send(Self.acquire("a"), 1)
        _ = driver.connected()
        #expect(driver.receive("error_auth\n") == ["closeTransport", "1: \(LockError.authFailed)", "ended(\(LockError.authFailed), notify: true)"])
    }

    @Test("the server hanging up during auth is a refused secret")
    func hangUpDuringAuth() {
        var driver = Driver(auth: "s3cret")
        _ = driver.send(Self.acquire("a"), 1)
        _ = driver.connected()
        #expect(driver.step { core, _, actions in core.transportFailed(.connectionClosed(reason: "EOF"), into: &actions) }
                == ["closeTransport", "1: \(LockError.authFailed)", "ended(\(LockError.authFailed), notify: true)"])
    }

    @Test("`error` to one of ten pipelined requests fails that one with the error its command implies; the other nine and the connection go on")
    func refusedRequestFailsAlone() {
        var driver = Driver()
        _ = driver.connected()
        var expected: [String] = []
        var replies = ""
        for index in 0..<10 {
            if index == 4 {
                _ = driver.send(Self.release("k4"), index)
                replies += "error\n"
                expected.append("4: \(LockError.notHeld(key: "k4"))")
            } else {
                _ = driver.send(Self.acquire("k\(index)"), index)
                replies += "timeout\n"
                expected.append("\(index): timeout")
            }
        }
        #expect(driver.receive(replies) == expected)
        #expect(driver.core.phase == .open)
        _ = driver.send(Self.acquire("after"), 10)
        #expect(driver.receive("timeout\n") == ["10: timeout"])
    }

    @Test("`error` to a well-formed acquire is serverError for that request only")
    func plainErrorToAcquire() {
        var driver = Driver()
        _ = driver.connected()
        _ = driver.send(Self.acquire("a"), 1)
        _ = driver.send(Self.acquire("b"), 2)
        #expect(driver.receive("error\ntimeout\n") == ["1: \(LockError.serverError(command: "l", key: "a"))", "2: timeout"])
        #expect(driver.core.phase == .open)
    }

    @Test("a line this client cannot read fails that request and every other, and ends the connection")
    func unreadableReplyEnds() throws {
        var driver = Driver()
        _ = driver.connected()
        _ = driver.send(Self.acquire("a"), 1)
        _ = driver.send(Self.acquire("b"), 2)
        let actions = driver.receive("queued\ntimeout\n")
        try #require(actions.count == 4, "\(actions)")
        #expect(actions[0].hasPrefix("1: the server sent something this client cannot accept"))
        #expect(actions[1] == "closeTransport")
        #expect(actions[2] == actions[0].replacingOccurrences(of: "1: ", with: "2: "))
        #expect(actions[3].hasPrefix("ended(") && actions[3].hasSuffix("notify: true)"))
        guard case .closed(.protocolViolation) = driver.core.phase else { Issue.record("\(driver.core.phase)"); return }
        #expect(driver.send(Self.acquire("c"), 3).first?.hasPrefix("3: the server sent something") == true)
    }

    @Test("a reply with nothing outstanding ends the connection")
    func unaskedReply() {
        var driver = Driver()
        _ = driver.connected()
        let actions = driver.receive("ok\n")
        #expect(actions.count == 2 && actions[0] == "closeTransport" && actions[1].hasPrefix("ended("))
    }

    @Test("the owner's close fails everything with `closed`, tells no one, and later requests fail at once")
    func ownerClose() {
        var driver = Driver()
        _ = driver.send(Self.acquire("a"), 1)
        _ = driver.connected()
        #expect(driver.step { core, _, actions in core.close(.closed, into: &actions) }
                == ["closeTransport", "1: \(LockError.closed)", "ended(\(LockError.closed), notify: false)"])
        #expect(driver.core.outbound.isEmpty)
        #expect(driver.send(Self.acquire("b"), 2) == ["2: \(LockError.closed)"])
        #expect(driver.step { core, _, actions in core.close(.closed, into: &actions) } == [], "close is idempotent")
        #expect(driver.step { core, _, actions in core.transportFailed(.connectionClosed(reason: "late"), into: &actions) } == [])
    }

    @Test("default deadlines: 10 s for a request, a blocking one its timeout plus 5 s")
    func defaults() {
        #expect(Connection.defaultRequestTimeoutMs == 10_000)
        #expect(Connection.defaultBlockingGraceMs == 5_000)
        let configuration = Connection.Configuration(tls: nil, auth: nil, connectTimeoutMs: nil, socketTimeoutMs: nil)
        #expect(configuration.limits == Self.limits)
    }

    @Test("a request's deadline: its own allowance, never before the one ahead of it")
    func deadlines() {
        var driver = Driver()
        _ = driver.connected()
        #expect(driver.deadline == -1)
        _ = driver.send(Self.acquire("a", 2), 1)   // blocking: 2 s + 5 s grace
        #expect(driver.deadline == 1_000 + 7_000)
        driver.now = 2_000
        _ = driver.send(Self.release("b"), 2)      // own deadline 12_000, later than the head's
        #expect(driver.deadline == 8_000)
        #expect(driver.fire(at: 7_999) == [])
        #expect(driver.receive("timeout\n") == ["1: timeout"])
        #expect(driver.deadline == 12_000)
        let actions = driver.fire(at: 12_000)
        let error = LockError.requestTimeout(command: "r", key: "b", milliseconds: 10_000)
        #expect(actions == ["closeTransport", "2: \(error)", "ended(\(error), notify: true)"])
    }

    @Test("a try (timeout 0) does not block on the server: a plain request's 10 s, not 0 s plus the 5 s grace")
    func tryDeadline() {
        var driver = Driver()
        _ = driver.connected()
        _ = driver.send(Self.acquire("a", 0), 1)
        #expect(driver.deadline == 1_000 + 10_000)
        #expect(driver.fire(at: 6_000) == [])
    }

    @Test("a request behind a longer one inherits its deadline")
    func inheritedDeadline() {
        var driver = Driver()
        _ = driver.connected()
        _ = driver.send(Self.acquire("a", 30), 1)   // 35 s
        _ = driver.send(Self.release("b"), 2)       // 10 s alone, but answered only after the acquire
        #expect(driver.receive("timeout\n") == ["1: timeout"])
        #expect(driver.deadline == 1_000 + 35_000)
    }

    @Test("a request made while connecting counts its deadline from then: a silent peer cannot hold it")
    func deadlineWhileConnecting() {
        var driver = Driver(auth: "s3cret")
        _ = driver.send(Self.acquire("a"), 1)
        #expect(driver.deadline == 11_000, "auth's deadline, then the request's")
        let actions = driver.fire(at: 11_000)
        let error = LockError.requestTimeout(command: "auth", key: "_", milliseconds: 10_000)
        #expect(actions == ["closeTransport", "1: \(error)", "ended(\(error), notify: true)"])
    }

    @Test("socketTimeoutMs: silence while a reply is owed, counted from the last byte, a blocking head adding its timeout")
    func socketTimeout() {
        var limits = Self.limits
        limits.socketTimeoutMs = 500
        var driver = Driver(limits: limits)
        _ = driver.connected()
        _ = driver.send(Self.acquire("a", 1), 1)
        #expect(driver.deadline == 1_000 + 1_500)
        _ = driver.send(Self.release("b"), 2)
        driver.now = 2_000
        #expect(driver.receive("timeout\n") == ["1: timeout"])
        #expect(driver.deadline == 2_500)
        #expect(driver.fire(at: 2_499) == [])
        let actions = driver.fire(at: 2_500)
        #expect(actions == ["closeTransport", "2: \(LockError.socketTimeout(milliseconds: 500))",
                            "ended(\(LockError.socketTimeout(milliseconds: 500)), notify: true)"])
    }

    @Test("keep-alive: a ping after keepAliveMs idle; its answer, even `error`, is nobody's and ends nothing")
    func keepAlive() {
        var limits = Self.limits
        limits.keepAliveMs = 2_000
        var driver = Driver(limits: limits)
        _ = driver.connected()
        #expect(driver.deadline == 3_000)
        _ = driver.takeOutbound()
        #expect(driver.fire(at: 3_000) == [])
        #expect(driver.takeOutbound() == "ping\n_\n\n")
        #expect(driver.deadline == 13_000, "the ping has a deadline too")
        #expect(driver.receive("error\n") == [])
        #expect(driver.core.phase == .open)
        #expect(driver.deadline == 5_000)
    }

    @Test("bytes split anywhere make the same completions")
    func splitReplies() {
        let replies = "ok \(Self.token) 33\r\ntimeout\nok\n"
        var reference: [String]?
        for cut in 0...replies.utf8.count {
            var driver = Driver()
            _ = driver.connected()
            _ = driver.send(Self.acquire("a"), 1)
            _ = driver.send(Self.acquire("b"), 2)
            _ = driver.send(Self.release("c"), 3)
            let bytes = Array(replies.utf8)
            var actions = driver.receive(String(decoding: bytes[..<cut], as: UTF8.self))
            actions += driver.receive(String(decoding: bytes[cut...], as: UTF8.self))
            if let reference { #expect(actions == reference, "cut at \(cut)") } else { reference = actions }
        }
        #expect(reference?.count == 3)
    }
}
