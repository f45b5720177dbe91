import Foundation

/// What a server reports about itself in reply to `stats` (dflockd 1.10 and later).
public struct ServerStats: Codable, Sendable, Hashable {
    /// Open client connections.
    public var connections: Int
    /// Keys held as locks, with their holder and queue.
    public var locks: [LockInfo]
    /// Keys in use as semaphores.
    public var semaphores: [SemaphoreInfo]
    /// Lock keys the server still tracks but nobody holds.
    public var idleLocks: [IdleInfo]
    /// Semaphore keys the server still tracks but nobody holds.
    public var idleSemaphores: [IdleInfo]

    /// A held lock.
    public struct LockInfo: Codable, Sendable, Hashable {
        /// The key.
        public var key: String
        /// The server's id for the holding connection.
        public var ownerConnId: Int
        /// Seconds until the lease runs out unless renewed.
        public var leaseExpiresInS: Double
        /// Connections queued behind the holder.
        public var waiters: Int

        enum CodingKeys: String, CodingKey {
            case key, waiters
            case ownerConnId = "owner_conn_id"
            case leaseExpiresInS = "lease_expires_in_s"
        }
    }

    /// A semaphore in use.
    public struct SemaphoreInfo: Codable, Sendable, Hashable {
        /// The key.
        public var key: String
        /// Its holder limit.
        public var limit: Int
        /// Holders now.
        public var holders: Int
        /// Connections queued for a slot.
        public var waiters: Int
    }

    /// A key with no holder, kept until the server's idle collection prunes it.
    public struct IdleInfo: Codable, Sendable, Hashable {
        /// The key.
        public var key: String
        /// Seconds since it was last used.
        public var idleS: Double

        enum CodingKeys: String, CodingKey {
            case key
            case idleS = "idle_s"
        }
    }

    enum CodingKeys: String, CodingKey {
        case connections, locks, semaphores
        case idleLocks = "idle_locks"
        case idleSemaphores = "idle_semaphores"
    }

    /// Decodes the JSON of a `stats` reply.
    static func decode(json: Substring) -> Result<ServerStats, LockError> {
        do {
            return .success(try JSONDecoder().decode(ServerStats.self, from: Data(json.utf8)))
        } catch {
            let shown = json.count > 80 ? "\(json.prefix(80))…" : String(json)
            return .failure(.protocolViolation("a stats reply that is not the expected JSON (\(error)): \(shown.debugDescription)"))
        }
    }
}
