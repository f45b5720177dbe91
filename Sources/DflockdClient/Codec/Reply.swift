import Glibc

/// A grant of a lock or of a semaphore slot: the token that proves it and its lease.
public struct Grant: Sendable, Hashable {
    /// The token the server issued; present it to release or renew.
    public let token: String
    /// The lease the server granted, in seconds.
    public let leaseS: Int

    /// Creates a grant. Grants normally come from the server; this is for tests and tools.
    public init(token: String, leaseS: Int) {
        self.token = token
        self.leaseS = leaseS
    }

    /// The fencing value in the token, on servers that issue one (2.1 and later); see
    /// ``fenceFromToken(_:)``.
    public var fence: UInt64? { fenceFromToken(token) }
}

/// A successful reply, typed by the request it answers.
enum Reply: Sendable, Equatable {
    /// `ok` to `auth`, `r`, `sr`, `ping`.
    case ok
    /// `ok <token> <lease>` to `l`, `w`, `sl`, `sw`; `acquired <token> <lease>` to `e`, `se`.
    case granted(Grant)
    /// `ok <seconds>` to `n`, `sn`.
    case renewed(remainingS: Int)
    /// `queued` to `e`, `se`.
    case queued
    /// `timeout` to `l`, `w`, `sl`, `sw`: nothing was granted (and a `w` waiter left the queue).
    case timeout
    /// `ok <json>` to `stats`. Indirect: every reply is copied a few times on its way to the
    /// machine, and the stats inline made each one 144 bytes.
    indirect case stats(ServerStats)
}

/// Turns one reply line into a typed reply or the error it stands for. Pure: no I/O.
enum ReplyDecoder {
    /// Decodes `line` (without its line break) as the answer to `request`.
    static func decode(_ line: UnsafeRawBufferPointer, for request: Request) -> Result<Reply, LockError> {
        if let reply = decodeCommonSuccess(line, for: request) {
            return .success(reply)
        }
        guard let text = utf8String(line) else {
            return .failure(.protocolViolation("a reply to '\(request.command.rawValue)' that is not valid UTF-8"))
        }
        return decode(text, for: request)
    }

    /// Decodes a reply line given as text.
    static func decode(_ line: String, for request: Request) -> Result<Reply, LockError> {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard let status = fields.first else {
            return .failure(unexpected(line, for: request))
        }
        switch (status, request.command) {
        case ("ok", .auth), ("ok", .release), ("ok", .semaphoreRelease), ("ok", .ping):
            return .success(.ok)
        case ("ok", .acquire), ("ok", .wait), ("ok", .semaphoreAcquire), ("ok", .semaphoreWait),
             ("acquired", .enqueue), ("acquired", .semaphoreEnqueue):
            guard fields.count >= 3, let lease = Int(fields[2]), lease >= 0 else {
                return .failure(unexpected(line, for: request))
            }
            // The token goes back in every renewal and release: one this client could not send
            // (whitespace other than a space, NUL, over-long) is as bad as no token at all.
            let token = String(fields[1])
            do throws(LockError) {
                try Validation.token(token)
            } catch {
                return .failure(unexpected(line, for: request, because: "its token cannot be sent back (it must be at most \(Validation.maximumLineBytes) bytes, without whitespace or NUL)"))
            }
            return .success(.granted(Grant(token: token, leaseS: lease)))
        case ("ok", .renew), ("ok", .semaphoreRenew):
            guard fields.count >= 2, let seconds = Int(fields[1]), seconds >= 0 else {
                return .failure(unexpected(line, for: request))
            }
            return .success(.renewed(remainingS: seconds))
        case ("queued", .enqueue), ("queued", .semaphoreEnqueue):
            return .success(.queued)
        case ("timeout", .acquire), ("timeout", .wait), ("timeout", .semaphoreAcquire), ("timeout", .semaphoreWait):
            return .success(.timeout)
        case ("ok", .stats):
            let json = line.drop(while: { $0 != " " }).dropFirst()
            return ServerStats.decode(json: Substring(json)).map(Reply.stats)
        default:
            return .failure(error(status: status, line: line, for: request))
        }
    }

    private static func error(status: Substring, line: String, for request: Request) -> LockError {
        let key = request.key
        switch status {
        case "error_auth": return .authFailed
        case "error_max_locks": return .maxLocks(key: key)
        case "error_max_waiters": return .maxWaiters(key: key)
        case "error_limit_mismatch": return .limitMismatch(key: key)
        case "error_not_enqueued": return .notEnqueued(key: key)
        case "error_already_enqueued": return .alreadyEnqueued(key: key)
        case "error_lease_expired": return .leaseExpired(key: key)
        case "error_draining": return .serverDraining
        case "error_not_leader":
            // The rest of the line is the leader's address as the server sent it; it is only
            // judged (parsed, matched against the configured servers) by whoever follows it.
            let hint = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().joined(separator: " ")
            return .notLeader(leader: hint.isEmpty ? nil : hint)
        case "error":
            // 0.5.0 answers plain `error` where newer servers have a distinct status.
            switch request.command {
            case .release, .renew, .semaphoreRelease, .semaphoreRenew: return .notHeld(key: key)
            case .wait, .semaphoreWait: return .notEnqueued(key: key)
            case .enqueue, .semaphoreEnqueue: return .alreadyEnqueued(key: key)
            default: return .serverError(command: request.command.rawValue, key: key)
            }
        case _ where status.hasPrefix("error"):
            return .serverError(command: request.command.rawValue, key: key)
        default:
            return unexpected(line, for: request)
        }
    }

    private static func unexpected(_ line: String, for request: Request, because reason: String? = nil) -> LockError {
        let shown = line.count > 80 ? "\(line.prefix(80))…" : line
        return .protocolViolation("unexpected reply \(shown.debugDescription) to '\(request.command.rawValue)'" + (reason.map { ": \($0)" } ?? ""))
    }

    /// The replies of every lock round trip (`ok <token> <lease>`, `ok`, `ok <n>`, `queued`,
    /// `timeout`, `acquired …`) read straight from the bytes, making no string but the token.
    /// Anything else, or anything unusual (non-ASCII, doubled spaces, extra fields), returns nil
    /// and goes through ``decode(_:for:)-(String,_)``, which stays the one definition of
    /// what a reply means.
    private static func decodeCommonSuccess(_ line: UnsafeRawBufferPointer, for request: Request) -> Reply? {
        // At most three fields, kept in place: an array of them was an allocation per reply.
        var fields = (0..<0, 0..<0, 0..<0)
        var fieldCount = 0
        var start = 0
        // One comparison for most bytes: printable ASCII other than the space is 0x21...0x7E.
        // A space separates fields; any other byte (a control character, DEL, non-ASCII) is
        // for the slow path to judge.
        guard let bytes = line.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return nil }
        for index in 0..<line.count {
            let byte = bytes[index]
            guard byte &- 0x21 >= 0x5E else { continue }
            guard byte == 0x20, index > start, fieldCount < 2 else { return nil }
            if fieldCount == 0 { fields.0 = start..<index } else { fields.1 = start..<index }
            fieldCount += 1
            start = index + 1
        }
        guard start < line.count else { return nil }
        switch fieldCount {
        case 0: fields.0 = start..<line.count
        case 1: fields.1 = start..<line.count
        default: fields.2 = start..<line.count
        }
        fieldCount += 1

        func range(_ index: Int) -> Range<Int> {
            switch index {
            case 0: return fields.0
            case 1: return fields.1
            default: return fields.2
            }
        }
        func field(_ index: Int, is literal: StaticString) -> Bool {
            let range = range(index)
            guard range.count == literal.utf8CodeUnitCount else { return false }
            return memcmp(line.baseAddress! + range.lowerBound, literal.utf8Start, range.count) == 0
        }
        func number(_ index: Int) -> Int? {
            let range = range(index)
            guard range.count <= 18 else { return nil }
            var value = 0
            for byte in line[range] {
                guard (0x30...0x39).contains(byte) else { return nil }
                value = value * 10 + Int(byte - 0x30)
            }
            return value
        }

        switch (fieldCount, request.command) {
        case (1, .release), (1, .semaphoreRelease), (1, .auth), (1, .ping):
            return field(0, is: "ok") ? .ok : nil
        case (1, .acquire), (1, .wait), (1, .semaphoreAcquire), (1, .semaphoreWait):
            return field(0, is: "timeout") ? .timeout : nil
        case (1, .enqueue), (1, .semaphoreEnqueue):
            return field(0, is: "queued") ? .queued : nil
        case (2, .renew), (2, .semaphoreRenew):
            guard field(0, is: "ok"), let seconds = number(1) else { return nil }
            return .renewed(remainingS: seconds)
        case (3, .acquire), (3, .wait), (3, .semaphoreAcquire), (3, .semaphoreWait):
            guard field(0, is: "ok") else { return nil }
            return grant(line, token: fields.1, lease: number(2))
        case (3, .enqueue), (3, .semaphoreEnqueue):
            guard field(0, is: "acquired") else { return nil }
            return grant(line, token: fields.1, lease: number(2))
        default:
            return nil
        }
    }

    private static func grant(_ line: UnsafeRawBufferPointer, token range: Range<Int>, lease: Int?) -> Reply? {
        // Printable ASCII without spaces (the scan of the line saw to that); over-long tokens
        // take the slow path, which rejects them with a reason.
        guard let lease, range.count <= Validation.maximumLineBytes else { return nil }
        return .granted(Grant(token: String(decoding: UnsafeRawBufferPointer(rebasing: line[range]), as: UTF8.self), leaseS: lease))
    }

    private static func utf8String(_ bytes: UnsafeRawBufferPointer) -> String? {
        // Replies are almost always ASCII; only other bytes need the full check.
        if !bytes.contains(where: { $0 >= 0x80 }) {
            return String(decoding: bytes, as: UTF8.self)
        }
        return String(validating: bytes, as: UTF8.self)
    }
}
