/// Chooses the server for a key: `(key, numberOfServers) -> index`, `0 ..< numberOfServers`.
public typealias ShardingStrategy = @Sendable (String, Int) -> Int

/// The placement every official dflockd client uses: CRC-32 (IEEE, as in zlib) of the key's
/// UTF-8 bytes, modulo the number of servers. Mixed fleets of clients agree on it.
public func stableHashShard(_ key: String, _ numServers: Int) -> Int {
    guard numServers > 0 else { return 0 }
    return Int(crc32(key.utf8) % UInt32(numServers))
}

/// CRC-32 with the reflected IEEE polynomial 0xEDB88320.
func crc32<Bytes: Sequence>(_ bytes: Bytes) -> UInt32 where Bytes.Element == UInt8 {
    var crc: UInt32 = 0xFFFF_FFFF
    for byte in bytes {
        crc = crc32Table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8)
    }
    return crc ^ 0xFFFF_FFFF
}

private let crc32Table: [UInt32] = (0..<256).map { index in
    var value = UInt32(index)
    for _ in 0..<8 {
        value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1
    }
    return value
}
