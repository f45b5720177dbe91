/// Checks applied to every caller-supplied value before it is encoded: whatever fails here never
/// reaches the wire. A newline in a key or token would otherwise inject a second command.
enum Validation {
    /// The longest key, token or argument a server accepts, in UTF-8 bytes: dflockd 0.5.0
    /// counts the line break against its 256-byte line limit.
    static let maximumLineBytes = 255
    /// The longest auth secret the Go server accepts, in UTF-8 bytes.
    static let maximumSecretBytes = 64 * 1024

    /// A lock or semaphore key: non-empty, at most 256 UTF-8 bytes, no whitespace, no NUL.
    static func key(_ key: String, name: String = "key") throws(LockError) {
        try word(key, name: name)
    }

    /// A token as the server issued it: opaque, but held to the same rules as a key.
    static func token(_ token: String, name: String = "token") throws(LockError) {
        try word(token, name: name)
    }

    /// An auth secret: non-empty, at most 64 KiB, no CR, LF or NUL. Never echoed in errors.
    static func secret(_ secret: String, name: String = "auth") throws(LockError) {
        if secret.isEmpty {
            throw .invalidArgument(name: name, reason: "must not be empty")
        }
        if secret.utf8.count > maximumSecretBytes {
            throw .invalidArgument(name: name, reason: "is longer than \(maximumSecretBytes) bytes")
        }
        if secret.utf8.contains(where: { $0 == 0x0A || $0 == 0x0D || $0 == 0x00 }) {
            throw .invalidArgument(name: name, reason: "must not contain a line break or NUL")
        }
    }

    /// Whole seconds the server waits: zero means try once.
    static func timeout(_ seconds: Int, name: String) throws(LockError) {
        if seconds < 0 {
            throw .invalidArgument(name: name, reason: "must be 0 or more seconds, got \(seconds)")
        }
    }

    /// A lease length: at least one second.
    static func lease(_ seconds: Int?, name: String = "leaseTtlS") throws(LockError) {
        if let seconds, seconds < 1 {
            throw .invalidArgument(name: name, reason: "must be at least 1 second, got \(seconds)")
        }
    }

    /// A semaphore limit: at least one holder.
    static func limit(_ limit: Int, name: String = "limit") throws(LockError) {
        if limit < 1 {
            throw .invalidArgument(name: name, reason: "must be at least 1, got \(limit)")
        }
    }

    /// Unicode's White_Space property, or NUL. Keys and tokens are nearly always ASCII, where
    /// the answer is six byte comparisons; the property lookup is for the rest.
    private static func containsWhitespaceOrNUL(_ value: String) -> Bool {
        // A native string's bytes are scanned in place (going through the UTF-8 view's indices
        // cost 15 instructions a byte, a tenth of a request's work); the view is for the rest.
        switch value.utf8.withContiguousStorageIfAvailable(scan) ?? scan(value.utf8) {
        case .whitespaceOrNUL: return true
        case .ascii: return false
        case .notASCII: return value.unicodeScalars.contains { $0.properties.isWhitespace }
        }
    }

    private enum ByteScan {
        case whitespaceOrNUL, ascii, notASCII
    }

    /// ASCII whitespace or NUL found, or else whether every byte is ASCII. A byte outside
    /// 0x21...0x7F (one comparison) is whitespace, NUL, another control character or non-ASCII.
    private static func scan(_ bytes: some Sequence<UInt8>) -> ByteScan {
        var isASCII = true
        for byte in bytes where byte &- 0x21 > 0x5E {
            switch byte {
            case 0x00, 0x09...0x0D, 0x20: return .whitespaceOrNUL
            case 0x80...: isASCII = false
            default: continue
            }
        }
        return isASCII ? .ascii : .notASCII
    }

    private static func word(_ value: String, name: String) throws(LockError) {
        if value.isEmpty {
            throw .invalidArgument(name: name, reason: "must not be empty")
        }
        if value.utf8.count > maximumLineBytes {
            throw .invalidArgument(name: name, reason: "is \(value.utf8.count) bytes of UTF-8; the server accepts at most \(maximumLineBytes)")
        }
        if containsWhitespaceOrNUL(value) {
            throw .invalidArgument(name: name, reason: "must not contain whitespace, line breaks or NUL: \(value.debugDescription)")
        }
    }
}
