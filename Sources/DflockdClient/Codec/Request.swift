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
        Self.append(command.rawValue, to: &buffer)
        buffer.append(0x0A)
        Self.append(key, to: &buffer)
        buffer.append(0x0A)
        appendArgument(to: &buffer)
        buffer.append(0x0A)
    }

    private func appendArgument(to buffer: inout [UInt8]) {
        Self.append(text, to: &buffer)
        var separated = !text.isEmpty
        numbers.forEach { number in
            if separated { buffer.append(0x20) }
            separated = true
            Self.appendDecimal(number, to: &buffer)
        }
    }

    /// A native string's UTF-8 is contiguous: copied in one go, not a code unit at a time
    /// through the generic `append(contentsOf:)` of a `String.UTF8View`.
    private static func append(_ string: String, to buffer: inout [UInt8]) {
        let copied: Void? = string.utf8.withContiguousStorageIfAvailable { buffer.append(contentsOf: $0) }
        if copied == nil { buffer.append(contentsOf: string.utf8) }
    }

    /// The encoded request.
    var bytes: [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(command.rawValue.utf8.count + key.utf8.count + text.utf8.count + 24)
        encode(into: &buffer)
        return buffer
    }

    /// Formats the digits on the stack, last first, then appends them in one go.
    private static func appendDecimal(_ number: Int, to buffer: inout [UInt8]) {
        if number < 0 { buffer.append(0x2D) }
        var rest = number.magnitude
        // 20 digits hold any UInt64.
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { digits in
            var start = digits.count
            repeat {
                start -= 1
                digits[start] = 0x30 + UInt8(rest % 10)
                rest /= 10
            } while rest > 0
            buffer.append(contentsOf: UnsafeBufferPointer(rebasing: digits[start...]))
        }
    }

    // MARK: - Factories, one per command

    static func auth(secret: String) throws(LockError) -> Request {
        try Validation.secret(secret)
        return Request(.auth, key: "_", text: secret)
    }

    static func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil) throws(LockError) -> Request {
        try Validation.key(key)
        try Validation.lease(leaseTtlS)
        return try .acquire(validatedKey: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS)
    }

    /// `l` for a lock's driver, whose key and lease were validated when the lock was made:
    /// only the timeout is checked, and the key is not scanned again on every acquire.
    static func acquire(validatedKey key: String, timeoutS: Int, leaseTtlS: Int?) throws(LockError) -> Request {
        try Validation.timeout(timeoutS, name: "timeoutS")
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
        try Validation.lease(leaseTtlS)
        return try .semaphoreAcquire(validatedKey: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS)
    }

    /// `sl` for a semaphore's driver, whose key, limit and lease were validated when it was
    /// made: only the timeout is checked.
    static func semaphoreAcquire(validatedKey key: String, limit: Int, timeoutS: Int, leaseTtlS: Int?) throws(LockError) -> Request {
        try Validation.timeout(timeoutS, name: "timeoutS")
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
