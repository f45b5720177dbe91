// Embedding: the program runs its own libuv loop on its own thread, and the lock runs inside it
// through the completion-handler API. No other thread is involved.
//
//     swift run Embedded --port 6388
import CUV
import DflockdClient
import Glibc

let port = CommandLine.arguments.firstIndex(of: "--port").flatMap { index in
    index + 1 < CommandLine.arguments.count ? Int(CommandLine.arguments[index + 1]) : nil
} ?? 6388

let rawLoop = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
uv_loop_init(rawLoop)
let loop = EventLoop(borrowing: rawLoop)

let lock = try DistributedLock(key: "embedded-job", leaseTtlS: 2, servers: [("127.0.0.1", port)],
                               onLockLost: { key, _ in print("lost \(key)!") }, loop: loop)

/// The program's own libuv timer: checks the lock's state while it renews in the background.
final class Ticker {
    var ticks = 0
    let handle = UnsafeMutablePointer<uv_timer_t>.allocate(capacity: 1)
}
let ticker = Ticker()
uv_timer_init(rawLoop, ticker.handle)

lock.acquire { result in
    guard case .success(true) = result else {
        print("not acquired: \(result)")
        loop.shutdown()
        return
    }
    print("acquired embedded-job with a 2 s lease; holding it for 3 s on this loop")
    uv_timer_start(ticker.handle, { _ in
        ticker.ticks += 1
        print("tick \(ticker.ticks): state \(lock.state), lease \(lock.lease) s")
        guard ticker.ticks == 3 else { return }
        uv_timer_stop(ticker.handle)
        uv_close(UnsafeMutableRawPointer(ticker.handle).assumingMemoryBound(to: uv_handle_t.self)) { handle in
            UnsafeMutableRawPointer(handle)?.deallocate()   // libuv is done with the memory now
        }
        lock.release { result in
            print("released: \(result)")
            loop.shutdown()
        }
    }, 1000, 1000)
}

// Runs until the lock's connection and timers and the program's ticker are all closed.
uv_run(rawLoop, UV_RUN_DEFAULT)
uv_loop_close(rawLoop)
rawLoop.deallocate()
print("loop finished")
