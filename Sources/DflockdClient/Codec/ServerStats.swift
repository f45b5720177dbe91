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
    /// This node's view of its Raft cluster, when the server runs in cluster mode (the newest
    /// dflockd, where cluster mode is beta); `nil` for a single server.
    public var cluster: ClusterInfo?

    /// Creates stats. Stats normally come from the server; this is for tests and tools.
    public init(connections: Int, locks: [LockInfo], semaphores: [SemaphoreInfo], idleLocks: [IdleInfo],
                idleSemaphores: [IdleInfo], cluster: ClusterInfo? = nil) {
        self.connections = connections
        self.locks = locks
        self.semaphores = semaphores
        self.idleLocks = idleLocks
        self.idleSemaphores = idleSemaphores
        self.cluster = cluster
    }

    /// A cluster member's view of the cluster: the `cluster` object of a `stats` reply, as the
    /// server's cluster documentation (`docs/operations/cluster.md`) describes it. A follower's
    /// view may lag the leader's; it is meant for monitoring.
    public struct ClusterInfo: Codable, Sendable, Hashable {
        /// This node's id (its `--node-id`).
        public var nodeId: String
        /// Its Raft role: `leader`, `follower`, `candidate` or `pre-candidate`.
        public var role: String
        /// The Raft term it is in.
        public var term: UInt64
        /// The id of the node it believes leads, or an empty string when it knows of none.
        public var leaderId: String
        /// The leader's client address (`host:port`, where redirected clients go), when known.
        public var leaderAddress: String?
        /// The highest log index known to be committed.
        public var commitIndex: UInt64
        /// The index of the last entry in this node's log.
        public var lastLogIndex: UInt64
        /// The log index its latest snapshot covers (0: none yet).
        public var snapshotIndex: UInt64
        /// The node ids of the voting members, in no particular order.
        public var voters: [String]

        /// Creates a cluster view. These normally come from the server; this is for tests.
        public init(nodeId: String, role: String, term: UInt64, leaderId: String, leaderAddress: String?,
                    commitIndex: UInt64, lastLogIndex: UInt64, snapshotIndex: UInt64, voters: [String]) {
            self.nodeId = nodeId
            self.role = role
            self.term = term
            self.leaderId = leaderId
            self.leaderAddress = leaderAddress
            self.commitIndex = commitIndex
            self.lastLogIndex = lastLogIndex
            self.snapshotIndex = snapshotIndex
            self.voters = voters
        }

        enum CodingKeys: String, CodingKey {
            case role, term, voters
            case nodeId = "node_id"
            case leaderId = "leader_id"
            case leaderAddress = "leader_addr"
            case commitIndex = "commit_index"
            case lastLogIndex = "last_log_index"
            case snapshotIndex = "snapshot_index"
        }
    }

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
        case connections, locks, semaphores, cluster
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
