/// The protocol's request verbs (`protocol.md`, "Commands").
enum Command: String, Sendable {
    case auth = "auth"
    case acquire = "l"
    case release = "r"
    case renew = "n"
    case enqueue = "e"
    case wait = "w"
    case semaphoreAcquire = "sl"
    case semaphoreRelease = "sr"
    case semaphoreRenew = "sn"
    case semaphoreEnqueue = "se"
    case semaphoreWait = "sw"
    case stats = "stats"
    case ping = "ping"

    /// Commands whose reply the server holds back until a grant or a timeout.
    var mayBlock: Bool {
        switch self {
        case .acquire, .wait, .semaphoreAcquire, .semaphoreWait: return true
        default: return false
        }
    }
}
