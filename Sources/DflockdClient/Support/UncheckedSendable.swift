/// Carries a loop-confined value across the hop to its loop thread.
///
/// Used only where the value is created on one thread and then used solely on the loop thread
/// (a completion handler, a transport to close), so no two threads ever touch it at once.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
