// The fuzz harness: one input drives either the reply codec (LineFramer + ReplyDecoder, every
// command) or a Connection's read path (requests pipelined over a fake Transport, the server's
// bytes fed in pieces), and checks invariants with `precondition`, so a violation is a crash
// libFuzzer reports with its input.
//
// Input layout (the seed generator, make-seeds.py, writes the same):
//   byte 0   bit 0: 0 = codec, 1 = connection; bit 1: configure an auth secret (connection);
//            bit 2: a socket timeout (connection: its timer is re-armed on every read);
//            bit 3: EOF after the bytes (connection); bits 4-7: how the bytes are cut (0: whole)
//   byte 1   bits 0-1: requests - 1 (connection: 1...4 pipelined requests)
//   then     one byte per request: its command (value % 13, in `FuzzHarness.commands` order)
//   rest     the bytes the server sends
//
// Compiled in debug builds (where `swift build` and `swift test` enable testable imports) and
// by `make fuzz` (-D DFLOCKD_FUZZ -enable-testing); a plain release build of the package gets
// the stub in Entry.swift, so `swift build -c release` does not need testability.

#if DEBUG || DFLOCKD_FUZZ
import CUV
@testable import DflockdClient

public enum FuzzHarness {
    /// The commands by number, as the input's request bytes name them.
    static let commands: [Command] = [
        .auth, .acquire, .release, .renew, .enqueue, .wait, .semaphoreAcquire, .semaphoreRelease,
        .semaphoreRenew, .semaphoreEnqueue, .semaphoreWait, .stats, .ping,
    ]

    static let token = "0123456789abcdef0123456789abcdef"

    /// A well-formed request for command number `number`.
    static func request(_ number: UInt8) -> Request {
        requests[Int(number) % requests.count]
    }

    /// One well-formed request per command, built once (validation is not free).
    static let requests: [Request] = commands.map(makeRequest)

    private static func makeRequest(_ command: Command) -> Request {
        do {
            switch command {
            case .auth: return try .auth(secret: "s3cret")
            case .acquire: return try .acquire(key: "k", timeoutS: 5, leaseTtlS: 30)
            case .release: return try .release(key: "k", token: token)
            case .renew: return try .renew(key: "k", token: token)
            case .enqueue: return try .enqueue(key: "k")
            case .wait: return try .wait(key: "k", timeoutS: 5)
            case .semaphoreAcquire: return try .semaphoreAcquire(key: "k", limit: 2, timeoutS: 5)
            case .semaphoreRelease: return try .semaphoreRelease(key: "k", token: token)
            case .semaphoreRenew: return try .semaphoreRenew(key: "k", token: token, leaseTtlS: 30)
            case .semaphoreEnqueue: return try .semaphoreEnqueue(key: "k", limit: 2)
            case .semaphoreWait: return try .semaphoreWait(key: "k", timeoutS: 5)
            case .stats: return .stats
            case .ping: return .ping
            }
        } catch {
            preconditionFailure("the harness built an invalid request: \(error)")
        }
    }

    struct Input {
        var connection = false
        var auth = false
        var socketTimeout = false
        var endOfStream = false
        var cutting: UInt8 = 0
        var requests: [Request] = []
        var payload: [UInt8] = []

        init(_ data: UnsafeRawBufferPointer) {
            guard let flags = data.first else { return }
            connection = flags & 1 != 0
            auth = flags & 2 != 0
            socketTimeout = flags & 4 != 0
            endOfStream = flags & 8 != 0
            cutting = flags >> 4
            let count = data.count > 1 ? Int(data[1] & 3) + 1 : 1
            let kinds = data.dropFirst(2).prefix(count)
            requests = kinds.map(FuzzHarness.request)
            if requests.isEmpty { requests = [FuzzHarness.request(1)] }
            payload = Array(data.dropFirst(2 + kinds.count))
        }

        /// Piece sizes for the payload, the same for the same input.
        func pieces() -> [Int] {
            guard cutting != 0, !payload.isEmpty else { return [payload.count] }
            var state = UInt32(cutting) &* 2_654_435_761 &+ UInt32(truncatingIfNeeded: payload.count) | 1
            var sizes: [Int] = []
            var left = payload.count
            while left > 0 {
                state ^= state << 13
                state ^= state >> 17
                state ^= state << 5
                let size = min(left, cutting == 15 ? 1 : 1 + Int(state % 24))
                sizes.append(size)
                left -= size
            }
            return sizes
        }
    }

    /// Runs one input. Traps on a broken invariant.
    public static func run(_ data: UnsafeRawBufferPointer) {
        let input = Input(data)
        if input.connection {
            runConnection(input)
        } else {
            runCodec(input)
        }
    }

    // MARK: - Codec

    struct Framed: Equatable {
        var lines: [[UInt8]] = []
        var error: LockError?
    }

    static func frame(_ bytes: [UInt8], pieces: [Int]) -> Framed {
        var framer = LineFramer()
        var framed = Framed()
        bytes.withUnsafeBytes { all in
            var offset = 0
            for size in pieces {
                let piece = UnsafeRawBufferPointer(rebasing: all[offset..<(offset + size)])
                offset += size
                do throws(LockError) {
                    try framer.feed(piece) { line in
                        framed.lines.append(Array(line))
                        return true
                    }
                } catch {
                    framed.error = error
                    return
                }
            }
        }
        precondition(framer.bufferedByteCount <= LineFramer.maximumLineBytes + 1, "the framer holds more than a line")
        return framed
    }

    static func runCodec(_ input: Input) {
        let payload = input.payload
        let whole = frame(payload, pieces: [payload.count])
        // However the bytes were cut by the reads, the same lines come out.
        precondition(frame(payload, pieces: input.pieces()) == whole, "framing depends on where the reads cut the bytes")
        precondition(frame(payload, pieces: Array(repeating: 1, count: payload.count)) == whole, "byte-by-byte framing differs")
        for line in whole.lines {
            // Only the CR right before the LF goes (`a\r\r\n` is the line `a\r`).
            precondition(!line.contains(0x0A), "a framed line kept its line break")
            for number in 0..<UInt8(commands.count) {
                let request = request(number)
                let result = line.withUnsafeBytes { ReplyDecoder.decode($0, for: request) }
                check(result, for: request)
            }
        }
    }

    /// What any decoded reply must satisfy.
    static func check(_ result: Result<Reply, LockError>, for request: Request) {
        switch result {
        case .success(let reply):
            switch (reply, request.command) {
            case (.ok, .auth), (.ok, .release), (.ok, .semaphoreRelease), (.ok, .ping):
                break
            case (.granted(let grant), .acquire), (.granted(let grant), .wait), (.granted(let grant), .semaphoreAcquire),
                 (.granted(let grant), .semaphoreWait), (.granted(let grant), .enqueue), (.granted(let grant), .semaphoreEnqueue):
                precondition(grant.leaseS >= 0, "a negative lease")
                // A token must be one the client can send back in a release or renewal.
                do {
                    try Validation.token(grant.token)
                } catch {
                    preconditionFailure("decoded a token the client cannot send back: \(grant.token.debugDescription)")
                }
            case (.renewed(let seconds), .renew), (.renewed(let seconds), .semaphoreRenew):
                precondition(seconds >= 0, "a negative renewal")
            case (.queued, .enqueue), (.queued, .semaphoreEnqueue):
                break
            case (.timeout, .acquire), (.timeout, .wait), (.timeout, .semaphoreAcquire), (.timeout, .semaphoreWait):
                break
            case (.stats, .stats):
                break
            default:
                preconditionFailure("reply \(reply) accepted for '\(request.command.rawValue)'")
            }
        case .failure(let error):
            let text = error.description
            precondition(!text.isEmpty && text.utf8.count < 2048, "an unclear or unbounded error: \(text.prefix(200))")
        }
    }

    // MARK: - Connection read path

    /// A transport that records what the connection writes and lets the harness play the
    /// server.
    final class FakeTransport: Transport {
        weak var delegate: (any TransportDelegate)?
        var written: [UInt8] = []
        var connects = 0
        var isClosed = false

        func connect(to endpoint: Endpoint, timeoutMilliseconds: Int?) { connects += 1 }

        func write(_ bytes: UnsafeRawBufferPointer) {
            precondition(!isClosed, "a write after close")
            written.append(contentsOf: bytes)
        }

        func close() {
            isClosed = true
            delegate = nil
        }
    }

    final class Probe: ConnectionDelegate {
        var closes: [LockError] = []
        func connection(_ connection: Connection, didCloseWith error: LockError) { closes.append(error) }
    }

    /// A loop this thread runs: libFuzzer calls every input on the same thread.
    nonisolated(unsafe) static var loop: EventLoop?

    static func currentLoop() -> EventLoop {
        if let loop { return loop }
        let raw = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
        precondition(uv_loop_init(raw) == 0)
        let made = EventLoop(borrowing: raw)
        loop = made
        return made
    }

    /// Runs what the connection left for later turns (completions, closes).
    static func drain(_ loop: EventLoop) {
        for _ in 0..<8 { uv_run(loop.raw, UV_RUN_NOWAIT) }
    }

    static func runConnection(_ input: Input) {
        let loop = currentLoop()
        weak var weakConnection: Connection?
        weak var weakTransport: FakeTransport?
        do {
            let probe = Probe()
            let configuration = Connection.Configuration(tls: nil, auth: input.auth ? "s3cret" : nil, connectTimeoutMs: nil,
                                                         socketTimeoutMs: input.socketTimeout ? 60_000 : nil)
            let connection = Connection(endpoint: Endpoint(host: "127.0.0.1", port: 1), configuration: configuration, loop: loop)
            weakConnection = connection
            connection.delegate = probe
            var made: FakeTransport?
            connection.makeTransport = { _ in
                let transport = FakeTransport()
                made = transport
                return transport
            }
            var outcomes = [Result<Reply, LockError>?](repeating: nil, count: input.requests.count)
            var order: [Int] = []
            for (index, request) in input.requests.enumerated() {
                connection.send(request) { result in
                    precondition(outcomes[index] == nil, "request \(index) completed twice")
                    outcomes[index] = result
                    order.append(index)
                    check(result, for: request)
                }
            }
            guard let transport = made else { preconditionFailure("no transport was made") }
            weakTransport = transport
            precondition(transport.connects == 1, "connected \(transport.connects) times")
            precondition(transport.written.isEmpty, "wrote before the transport connected")
            transport.delegate?.transportDidConnect(transport)

            // Everything goes out at once, in order, auth first.
            var expected: [UInt8] = []
            if input.auth { (try? Request.auth(secret: "s3cret"))?.encode(into: &expected) }
            for request in input.requests { request.encode(into: &expected) }
            precondition(transport.written == expected, "the requests did not go out as encoded, in order")

            var offset = 0
            for size in input.pieces() where !input.payload.isEmpty {
                guard let delegate = transport.delegate else { break }
                input.payload[offset..<(offset + size)].withUnsafeBytes { delegate.transport(transport, didRead: $0) }
                offset += size
            }
            if input.endOfStream, let delegate = transport.delegate {
                delegate.transport(transport, didFailWith: .connectionClosed(reason: "the server closed the connection"))
            }
            drain(loop)
            precondition(order == Array(order.indices), "completions out of request order: \(order)")
            if transport.isClosed {
                precondition(order.count == input.requests.count, "the connection ended with calls still pending")
                precondition(probe.closes.count <= 1, "the delegate heard of the end \(probe.closes.count) times")
            }
            // A failure that ended the connection fails every later call too.
            if let failed = outcomes.firstIndex(where: { if case .failure(let error) = $0, ConnectionCore<Int>.endsConnection(error) { return true }; return false }) {
                for later in outcomes[failed...] {
                    if case .success = later { preconditionFailure("a call succeeded after the connection failed") }
                }
            }

            connection.close()
            drain(loop)
            precondition(order.count == input.requests.count, "close() left calls pending")
            precondition(order == Array(order.indices), "completions out of request order: \(order)")
            precondition(transport.isClosed, "close() left the transport open")
            precondition(probe.closes.count <= 1, "the delegate heard of the end \(probe.closes.count) times")
        }
        drain(loop)
        precondition(weakConnection == nil, "the connection outlived its last reference")
        precondition(weakTransport == nil, "the transport outlived its connection")
    }
}
#endif
