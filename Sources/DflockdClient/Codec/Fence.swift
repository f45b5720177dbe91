/// The fencing value carried by a token from a dflockd 2.1 or later server: its first 16 hex
/// characters read as a big-endian `UInt64`, which strictly increases with every grant.
///
/// A downstream store that keeps the highest fence it has seen for a key, and rejects writes
/// carrying a lower one, is safe even against a holder that lost its lease without noticing.
/// Tokens from older servers (0.5.0 to 2.0) are random: their "fence" parses but orders nothing.
/// The protocol does not say which version answers; `dflockd --version` on the server does.
///
/// - Returns: The fence, or `nil` when the token does not start with 16 hex characters.
public func fenceFromToken(_ token: String) -> UInt64? {
    let utf8 = token.utf8
    guard utf8.count >= 16 else { return nil }
    var value: UInt64 = 0
    for byte in utf8.prefix(16) {
        let digit: UInt8
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
        default: return nil
        }
        value = value << 4 | UInt64(digit)
    }
    return value
}
