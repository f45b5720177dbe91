/// One request as it goes on the wire: `command\nkey\nargument\n`.
///
/// Requests are built only through the validating factories below, so an encoded request never
/// carries a stray line break.
struct Request: Sendable, Hashable {
    let command: Command
    let key: String
    let argument: String
    /// For a command the server may hold back: the longest it may wait, in seconds.
    let blockingSeconds: Int?

    private init(_ command: Command, key: String, argument: String, blockingSeconds: Int? = nil) {
        self.command = command
        self.key = key
        self.argument = argument
        self.blockingSeconds = blockingSeconds
    }

    /// Appends the three lines to `buffer`.
    func encode(into buffer: inout [UInt8]) {
        buffer.append(contentsOf: command.rawValue.utf8)
        buffer.append(0x0A)
        buffer.append(contentsOf: key.utf8)
        buffer.append(0x0A)
        buffer.append(contentsOf: argument.utf8)
        buffer.append(0x0A)
    }

    /// The encoded request.
    var bytes: [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(command.rawValue.utf8.count + key.utf8.count + argument.utf8.count + 3)
        encode(into: &buffer)
        return buffer
    }

    // MARK: - Factories, one per command

    static func auth(secret: String) throws(LockError) -> Request {
        try Validation.secret(secret)
        return Request(.auth, key: "_", argument: secret)
    }

    static func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        try Validation.lease(leaseTtlS)
        return Request(.acquire, key: key, argument: joined(timeoutS, leaseTtlS), blockingSeconds: timeoutS)
    }

    static func release(key: String, token: String) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        return Request(.release, key: key, argument: token)
    }

    static func renew(key: String, token: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        try Validation.lease(leaseTtlS)
        return Request(.renew, key: key, argument: leaseTtlS.map { "\(token) \($0)" } ?? token)
    }

    /// `n` / `sn` (`semaphore`) and `r` / `sr` for a lock's driver, whose key was validated
    /// when the lock was made and whose token was validated when its grant was decoded: the
    /// same requests as the checked factories, without checking again on every renewal.
    static func renew(validatedKey key: String, validatedToken token: String, leaseTtlS: Int?, semaphore: Bool) -> Request {
        Request(semaphore ? .semaphoreRenew : .renew, key: key, argument: leaseTtlS.map { "\(token) \($0)" } ?? token)
    }

    static func release(validatedKey key: String, validatedToken token: String, semaphore: Bool) -> Request {
        Request(semaphore ? .semaphoreRelease : .release, key: key, argument: token)
    }

    static func enqueue(key: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.lease(leaseTtlS)
        return Request(.enqueue, key: key, argument: leaseTtlS.map(String.init) ?? "")
    }

    static func wait(key: String, timeoutS: Int) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        return Request(.wait, key: key, argument: String(timeoutS), blockingSeconds: timeoutS)
    }

    static func semaphoreAcquire(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.limit(limit)
        try Validation.timeout(timeoutS, name: "timeoutS")
        try Validation.lease(leaseTtlS)
        return Request(.semaphoreAcquire, key: key, argument: joined(timeoutS, limit, leaseTtlS), blockingSeconds: timeoutS)
    }

    static func semaphoreRelease(key: String, token: String) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        return Request(.semaphoreRelease, key: key, argument: token)
    }

    static func semaphoreRenew(key: String, token: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        try Validation.lease(leaseTtlS)
        return Request(.semaphoreRenew, key: key, argument: leaseTtlS.map { "\(token) \($0)" } ?? token)
    }

    static func semaphoreEnqueue(key: String, limit: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.limit(limit)
        try Validation.lease(leaseTtlS)
        return Request(.semaphoreEnqueue, key: key, argument: joined(limit, leaseTtlS))
    }

    static func semaphoreWait(key: String, timeoutS: Int) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        return Request(.semaphoreWait, key: key, argument: String(timeoutS), blockingSeconds: timeoutS)
    }

    static let stats = Request(.stats, key: "_", argument: "")
    static let ping = Request(.ping, key: "_", argument: "")

    private static func joined(_ numbers: Int?...) -> String {
        numbers.compactMap { $0.map(String.init) }.joined(separator: " ")
    }
}

// A request can carry the auth secret: its text forms and its mirror (`dump`, debuggers, test
// failure messages) show every field but that one.
extension Request: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The argument as it may be shown: the auth secret is redacted.
    var shownArgument: String { command == .auth ? "<redacted>" : argument }

    var description: String { "\(command.rawValue) \(key) \(shownArgument)" }

    var debugDescription: String {
        "Request(\(command.rawValue.debugDescription), key: \(key.debugDescription), argument: \(command == .auth ? shownArgument : argument.debugDescription))"
    }

    var customMirror: Mirror {
        Mirror(self, children: ["command": command, "key": key, "argument": shownArgument, "blockingSeconds": blockingSeconds as Any],
               displayStyle: .struct)
    }
}
