/// Carries a loop-confined value across the hop to its loop thread.
///
/// Used only where the value is created on one thread and then used solely on the loop thread
/// (a completion handler, a transport to close), so no two threads ever touch it at once.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

extension EventLoop {
    /// Runs `body` now when called on the loop thread, otherwise on the loop's next turn. When
    /// the loop has shut down, `body` never runs and `ifShutDown` runs on the calling thread
    /// instead: it should complete whatever `body` would have.
    func runOnLoop(ifShutDown: (() -> Void)? = nil, _ body: @escaping () -> Void) {
        if inEventLoop {
            body()
        } else {
            let box = UncheckedSendable(body)
            if !tryExecute({ box.value() }) { ifShutDown?() }
        }
    }

    /// Runs `body` on a later turn of the loop, never inside the caller's stack: completion
    /// handlers are not called before the method that takes them returns. Once the loop has
    /// shut down there is no later turn, and `body` runs at once on the calling thread.
    func runLater(_ body: @escaping () -> Void) {
        let box = UncheckedSendable(body)
        if !tryExecute({ box.value() }) { body() }
    }
}
