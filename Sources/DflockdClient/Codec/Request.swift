/// One request as it goes on the wire: `command\nkey\nargument\n`.
///
/// Requests are built only through the validating factories below, so an encoded request never
/// carries a stray line break.
struct Request: Sendable, Hashable {
    let command: Command
    let key: String
    /// The argument line is `text`, then `numbers` in decimal, separated by single spaces:
    /// kept apart, so that building a renewal (`token lease`) or an acquire (`timeout lease`)
    /// formats no string; the numbers are written straight into the write buffer.
    private let text: String
    private let numbers: Numbers
    /// For a command the server may hold back: the longest it may wait, in seconds.
    let blockingSeconds: Int?

    /// Up to three numbers of an argument line, each possibly absent.
    private struct Numbers: Sendable, Hashable {
        var first: Int?
        var second: Int?
        var third: Int?

        static let none = Numbers()

        func forEach(_ body: (Int) -> Void) {
            if let first { body(first) }
            if let second { body(second) }
            if let third { body(third) }
        }
    }

    private init(_ command: Command, key: String, text: String = "", numbers: Numbers = .none, blockingSeconds: Int? = nil) {
        self.command = command
        self.key = key
        self.text = text
        self.numbers = numbers
        self.blockingSeconds = blockingSeconds
    }

    /// The argument line, without its line break (for logs and tests; the wire gets
    /// ``encode(into:)``).
    var argument: String {
        var line: [UInt8] = []
        appendArgument(to: &line)
        return String(decoding: line, as: UTF8.self)
    }

    /// Appends the three lines to `buffer`.
    func encode(into buffer: inout [UInt8]) {
        buffer.append(contentsOf: command.rawValue.utf8)
        buffer.append(0x0A)
        buffer.append(contentsOf: key.utf8)
        buffer.append(0x0A)
        appendArgument(to: &buffer)
        buffer.append(0x0A)
    }

    private func appendArgument(to buffer: inout [UInt8]) {
        buffer.append(contentsOf: text.utf8)
        var separated = !text.isEmpty
        numbers.forEach { number in
            if separated { buffer.append(0x20) }
            separated = true
            Self.appendDecimal(number, to: &buffer)
        }
    }

    /// The encoded request.
    var bytes: [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(command.rawValue.utf8.count + key.utf8.count + text.utf8.count + 24)
        encode(into: &buffer)
        return buffer
    }

    private static func appendDecimal(_ number: Int, to buffer: inout [UInt8]) {
        if number < 0 { buffer.append(0x2D) }
        var rest = number.magnitude
        var divisor: UInt = 1
        while divisor <= rest / 10 { divisor *= 10 }
        while divisor > 0 {
            buffer.append(0x30 + UInt8(rest / divisor))
            rest %= divisor
            divisor /= 10
        }
    }

    // MARK: - Factories, one per command

    static func auth(secret: String) throws(LockError) -> Request {
        try Validation.secret(secret)
        return Request(.auth, key: "_", text: secret)
    }

    static func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        try Validation.lease(leaseTtlS)
        return Request(.acquire, key: key, numbers: Numbers(first: timeoutS, second: leaseTtlS), blockingSeconds: timeoutS)
    }

    static func release(key: String, token: String) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        return .release(validatedKey: key, validatedToken: token, semaphore: false)
    }

    static func renew(key: String, token: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        try Validation.lease(leaseTtlS)
        return .renew(validatedKey: key, validatedToken: token, leaseTtlS: leaseTtlS, semaphore: false)
    }

    /// `n` / `sn` (`semaphore`) and `r` / `sr` for a lock's driver, whose key was validated
    /// when the lock was made and whose token was validated when its grant was decoded: what
    /// the checked factories build once they have checked, without checking again on every
    /// renewal.
    static func renew(validatedKey key: String, validatedToken token: String, leaseTtlS: Int?, semaphore: Bool) -> Request {
        Request(semaphore ? .semaphoreRenew : .renew, key: key, text: token, numbers: Numbers(first: leaseTtlS))
    }

    static func release(validatedKey key: String, validatedToken token: String, semaphore: Bool) -> Request {
        Request(semaphore ? .semaphoreRelease : .release, key: key, text: token)
    }

    static func enqueue(key: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.lease(leaseTtlS)
        return Request(.enqueue, key: key, numbers: Numbers(first: leaseTtlS))
    }

    static func wait(key: String, timeoutS: Int) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        return Request(.wait, key: key, numbers: Numbers(first: timeoutS), blockingSeconds: timeoutS)
    }

    static func semaphoreAcquire(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.limit(limit)
        try Validation.timeout(timeoutS, name: "timeoutS")
        try Validation.lease(leaseTtlS)
        return Request(.semaphoreAcquire, key: key, numbers: Numbers(first: timeoutS, second: limit, third: leaseTtlS), blockingSeconds: timeoutS)
    }

    static func semaphoreRelease(key: String, token: String) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        return .release(validatedKey: key, validatedToken: token, semaphore: true)
    }

    static func semaphoreRenew(key: String, token: String, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.token(token)
        try Validation.lease(leaseTtlS)
        return .renew(validatedKey: key, validatedToken: token, leaseTtlS: leaseTtlS, semaphore: true)
    }

    static func semaphoreEnqueue(key: String, limit: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.limit(limit)
        try Validation.lease(leaseTtlS)
        return Request(.semaphoreEnqueue, key: key, numbers: Numbers(first: limit, second: leaseTtlS))
    }

    static func semaphoreWait(key: String, timeoutS: Int) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.timeout(timeoutS, name: "timeoutS")
        return Request(.semaphoreWait, key: key, numbers: Numbers(first: timeoutS), blockingSeconds: timeoutS)
    }

    static let stats = Request(.stats, key: "_")
    static let ping = Request(.ping, key: "_")
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
