/// Carries a loop-confined value across the hop to its loop thread.
///
/// Used only where the value is created on one thread and then used solely on the loop thread
/// (a completion handler, a transport to close), so no two threads ever touch it at once.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

extension EventLoop {
    /// Runs `body` now when called on the loop thread, otherwise on the loop's next turn.
    func runOnLoop(_ body: @escaping () -> Void) {
        if inEventLoop {
            body()
        } else {
            let box = UncheckedSendable(body)
            execute { box.value() }
        }
    }

    /// Runs `body` on a later turn of the loop, never inside the caller's stack: completion
    /// handlers are not called before the method that takes them returns.
    func runLater(_ body: @escaping () -> Void) {
        let box = UncheckedSendable(body)
        execute { box.value() }
    }
}
