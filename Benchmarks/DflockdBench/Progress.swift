import Dispatch
import Glibc

/// The progress line on stderr: nothing during the first second, then one update a second
/// (rewritten in place on a terminal, one line each otherwise), ended by a newline.
///
/// Used from the main thread only. Counts its own `write(2)` calls and bytes so that the holders
/// mode can take them out of the process's I/O counters.
final class ProgressLine {
    private let isTerminal = isatty(2) != 0
    private var shown = false
    private(set) var writeCalls = 0
    private(set) var writtenBytes = 0

    func update(_ text: String) {
        emit(isTerminal ? "\r\(text)\u{1B}[K" : "\(text)\n")
        shown = true
    }

    /// Ends the line if anything was shown.
    func finish() {
        if shown && isTerminal { emit("\n") }
        shown = false
    }

    private func emit(_ text: String) {
        let (calls, bytes) = writeAll(text, to: 2)
        writeCalls += calls
        writtenBytes += bytes
    }

    /// Blocks until `done` is signalled, updating the line with `status()` once a second from
    /// the first second on.
    func wait(for done: DispatchSemaphore, status: () -> String) {
        while done.wait(timeout: .now() + .seconds(1)) == .timedOut {
            update(status())
        }
        finish()
    }
}
