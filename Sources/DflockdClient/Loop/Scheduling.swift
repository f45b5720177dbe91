// How the layers above hand work to the loop thread.

extension EventLoop {
    /// Runs `body` now when called on the loop thread, otherwise on the loop's next turn. When
    /// the loop has shut down, `body` never runs, on any thread, and `ifShutDown` runs on the
    /// calling thread instead: it should complete whatever `body` would have.
    func runOnLoop(ifShutDown: () -> Void = {}, _ body: @escaping () -> Void) {
        if inEventLoop {
            if isShutDown { ifShutDown() } else { body() }
        } else if !tryExecute(body) {
            ifShutDown()
        }
    }

    /// Runs `body` on a later turn of the loop, never inside the caller's stack: completion
    /// handlers are not called before the method that takes them returns. Once the loop has
    /// shut down there is no later turn, and `body` runs at once on the calling thread.
    func runLater(_ body: @escaping () -> Void) {
        if !tryExecute(body) { body() }
    }
}
