import Glibc

/// Splits a byte stream into reply lines, however the bytes were cut by the reads.
///
/// A line arriving whole inside one read is handed out in place, without a copy; only a line
/// split across reads is gathered in `partial`. Lines end at `\n`; a trailing `\r` is dropped.
struct LineFramer: Sendable {
    /// The longest reply line accepted, without its line break. `stats` is the largest reply and
    /// grows with the number of keys, so the limit is generous.
    static let maximumLineBytes = 1 << 20

    private var partial: [UInt8] = []

    /// Bytes of an incomplete line held so far.
    var bufferedByteCount: Int { partial.count }

    /// Feeds bytes, calling `onLine` for each complete line, in order, until it returns false.
    ///
    /// - Throws: ``LockError/protocolViolation(_:)`` when a line grows past the limit.
    mutating func feed(_ bytes: UnsafeRawBufferPointer, onLine: (UnsafeRawBufferPointer) -> Bool) throws(LockError) {
        guard let base = bytes.baseAddress else { return }
        var start = 0
        while start < bytes.count {
            guard let newline = memchr(base + start, 0x0A, bytes.count - start) else { break }
            let end = UnsafeRawPointer(newline) - base
            let keepGoing: Bool
            if partial.isEmpty {
                let line = Self.trimmed(UnsafeRawBufferPointer(rebasing: bytes[start..<end]))
                try Self.checkLength(line.count)
                keepGoing = onLine(line)
            } else {
                partial.append(contentsOf: bytes[start..<end])
                let count = partial.last == 0x0D ? partial.count - 1 : partial.count
                try Self.checkLength(count)
                keepGoing = partial.withUnsafeBytes { onLine(Self.trimmed($0)) }
                partial.removeAll(keepingCapacity: false)
            }
            start = end + 1
            if !keepGoing { return }
        }
        if start < bytes.count {
            partial.append(contentsOf: bytes[start...])
            // One byte past the limit may still be the `\r` of a `\r\n`; anything else is over.
            let excess = partial.count - Self.maximumLineBytes
            if excess > 1 || (excess == 1 && partial.last != 0x0D) {
                partial.removeAll()
                try Self.checkLength(Self.maximumLineBytes + excess)
            }
        }
    }

    private static func checkLength(_ count: Int) throws(LockError) {
        if count > maximumLineBytes {
            throw .protocolViolation("a reply line longer than \(maximumLineBytes) bytes")
        }
    }

    private static func trimmed(_ line: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        if let last = line.last, last == 0x0D {
            return UnsafeRawBufferPointer(rebasing: line.dropLast())
        }
        return line
    }
}
