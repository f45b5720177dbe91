/// The life cycle of one connection a ``LockSession`` shares among its locks, as a pure value:
/// events in, actions out.
///
/// Every rule that decides what happens to the shared connection lives here: it opens on
/// demand (the first lock that needs it), admits the locks that wait for it once it is ready,
/// and when it ends, every lock on it learns of the loss at once (each lock's own
/// ``LeaseMachine`` then decides what the loss means for it). A failed connect fails the
/// locks that waited for it with the reason and starts a back-off (bounded, with jitter)
/// during which further locks fail at once with the same reason; the first lock after it tries
/// again. After ``Event/closeRequested`` it opens nothing more.
///
/// Locks are named by ``Member`` (the driver's handle for one lock's session on the
/// connection); the driver (``LockSession``) performs the actions.
struct SharedConnectionMachine: Sendable {
    /// One connection's generation: events of an earlier connection are stale.
    typealias Generation = UInt64

    /// One lock's session on the shared connection (allocated by the driver).
    struct Member: Sendable, Hashable {
        let raw: UInt64
    }

    enum Phase: Sendable, Hashable {
        /// No connection: the next lock opens one.
        case idle
        case connecting(Generation)
        case open(Generation)
        /// The last connect failed with `reason`; until `untilMs` locks fail with it.
        case backingOff(untilMs: UInt64, reason: LockError)
        case closed
    }

    enum Event: Sendable, Hashable {
        /// A lock wants the connection (the loop's time is `nowMs`).
        case attachRequested(Member, nowMs: UInt64)
        /// A lock leaves: dropped, or its member could not serve it again (a lock stays a
        /// member between acquisitions while the connection is open).
        case detachRequested(Member)
        case connected(Generation)
        /// The connection of `Generation` failed to open or ended; `random` picks the back-off
        /// jitter.
        case ended(Generation, LockError, nowMs: UInt64, random: UInt64)
        case closeRequested
    }

    enum Action: Sendable, Hashable {
        case open(Generation)
        /// These members are on the open connection now.
        case admit([Member])
        /// These members cannot have the connection, for `LockError`.
        case reject([Member], LockError)
        /// The connection these members were on ended with `LockError`.
        case lost([Member], LockError)
        /// Close the connection once what was sent on it is answered.
        case closeWhenAnswered(Generation)
    }

    /// The shortest and the longest back-off after a failed connect.
    static let firstBackoffMs: UInt64 = 100
    static let maxBackoffMs: UInt64 = 5_000

    private(set) var phase = Phase.idle
    private(set) var generation: Generation = 0
    /// Waiting for the connection to open, in the order they asked.
    private(set) var waiting: [Member] = []
    /// On the open connection.
    private(set) var attached: Set<Member> = []
    /// Failed connects since the connection was last open.
    private(set) var failures = 0

    mutating func handle(_ event: Event) -> [Action] {
        switch event {
        case .attachRequested(let member, let nowMs):
            return attach(member, nowMs: nowMs)
        case .detachRequested(let member):
            if attached.remove(member) == nil, let index = waiting.firstIndex(of: member) {
                waiting.remove(at: index)
            }
            return []
        case .connected(let connected):
            guard case .connecting(let current) = phase, current == connected else { return [] }
            phase = .open(current)
            failures = 0
            let admitted = waiting
            waiting.removeAll()
            attached.formUnion(admitted)
            return admitted.isEmpty ? [] : [.admit(admitted)]
        case .ended(let ended, let error, let nowMs, let random):
            switch phase {
            case .connecting(let current) where current == ended:
                failures += 1
                phase = .backingOff(untilMs: nowMs + Self.backoffMs(failures: failures, random: random), reason: error)
                let rejected = waiting
                waiting.removeAll()
                return rejected.isEmpty ? [] : [.reject(rejected, error)]
            case .open(let current) where current == ended:
                phase = .idle
                let lost = Array(attached)
                attached.removeAll()
                return lost.isEmpty ? [] : [.lost(lost, error)]
            default:
                return []
            }
        case .closeRequested:
            var actions: [Action] = []
            if !waiting.isEmpty { actions.append(.reject(waiting, .sessionClosed)) }
            switch phase {
            case .connecting(let current), .open(let current):
                actions.append(.closeWhenAnswered(current))
            case .idle, .backingOff, .closed:
                break
            }
            phase = .closed
            waiting.removeAll()
            attached.removeAll()
            return actions
        }
    }

    private mutating func attach(_ member: Member, nowMs: UInt64) -> [Action] {
        switch phase {
        case .closed:
            return [.reject([member], .sessionClosed)]
        case .open:
            attached.insert(member)
            return [.admit([member])]
        case .connecting:
            waiting.append(member)
            return []
        case .backingOff(let untilMs, let reason) where nowMs < untilMs:
            return [.reject([member], reason)]
        case .idle, .backingOff:
            generation += 1
            phase = .connecting(generation)
            waiting.append(member)
            return [.open(generation)]
        }
    }

    /// Doubling from ``firstBackoffMs`` to at most ``maxBackoffMs``, less up to a quarter at
    /// random, so that many clients that lost one server do not all come back at once.
    static func backoffMs(failures: Int, random: UInt64) -> UInt64 {
        let doubled = firstBackoffMs << UInt64(min(max(failures - 1, 0), 16))
        let base = min(doubled, maxBackoffMs)
        return base - random % (base / 4 + 1)
    }
}
