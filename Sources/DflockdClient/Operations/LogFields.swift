import Logging

/// The metadata names every log record of this library uses, stable across versions so that
/// log queries keep working. A record carries the ones that apply to it.
enum LogField {
    /// The lock or semaphore key.
    static let key = "dflockd.key"
    /// `host:port` of the server.
    static let server = "dflockd.server"
    /// The lock's ``LockState`` after a change.
    static let state = "dflockd.state"
    /// `lock` or `semaphore`.
    static let kind = "dflockd.kind"
    /// The first characters of a token: enough to tell grants apart, too few to release one.
    static let token = "dflockd.token_prefix"
    /// Why something ended, failed or was lost.
    static let reason = "dflockd.reason"
    /// The cluster leader a follower's `error_not_leader` named, when the redirect is followed.
    static let leader = "dflockd.leader"
    /// Lease seconds the server granted.
    static let leaseS = "dflockd.lease_s"
    /// Milliseconds from a loss to the lease's local deadline (negative: after it).
    static let beforeDeadlineMs = "dflockd.before_deadline_ms"
    /// Round-trip time of a request, milliseconds.
    static let roundTripMs = "dflockd.rtt_ms"
    /// Milliseconds that were left of the lease when a renewal was sent.
    static let remainingMs = "dflockd.remaining_ms"
    /// The protocol command of a request (`l`, `n`, `sl`, …).
    static let command = "dflockd.command"
    /// Milliseconds an operation took.
    static let elapsedMs = "dflockd.elapsed_ms"
}

/// What may be logged of secrets. The auth secret and a TLS key password are never logged at
/// all; a token only by its first characters (on some servers a whole token releases the lock).
enum Redaction {
    /// Characters of a token that may appear in a log record.
    static let tokenPrefixLength = 6

    static func token(_ token: String) -> String {
        token.count > tokenPrefixLength ? String(token.prefix(tokenPrefixLength)) + "…" : "…"
    }

    /// An error's description fit for a log record: a token it names is shortened to its
    /// prefix, and text the server sent (inside a protocol violation) has every long word —
    /// where a token would be — shortened the same way.
    static func error(_ error: LockError) -> String {
        switch error {
        case .lockLost(let key, let token):
            return LockError.lockLost(key: key, token: Self.token(token)).description
        case .protocolViolation(let detail):
            return LockError.protocolViolation(shorteningLongWords(detail)).description
        default:
            return error.description
        }
    }

    /// Every run of 16 or more letters, digits, `-` or `_` cut to its first characters.
    static func shorteningLongWords(_ text: String) -> String {
        var result = ""
        var word = ""
        func flush() {
            result += word.count >= 16 ? token(word) : word
            word = ""
        }
        for character in text {
            if character.isLetter || character.isNumber || character == "-" || character == "_" {
                word.append(character)
            } else {
                flush()
                result.append(character)
            }
        }
        flush()
        return result
    }
}

extension Logger {
    /// The logger of an object created without one: it logs nothing, and costs one level check
    /// per log statement. One value shared by all (the default arguments of the public
    /// initializers), so that a lock made without a logger allocates none.
    @usableFromInline static let disabled = Logger(label: "dflockd", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Whether this logger can never log anything (its handler is swift-log's no-op one, as
    /// ``disabled``'s is): checked once when a lock or connection is made, so that their hot
    /// paths skip even the level checks, which read the handler through its existential on
    /// every statement.
    var logsNothing: Bool { handler is SwiftLogNoOpLogHandler }
}
