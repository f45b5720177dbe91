// Tests of `TickTimers`, the one-libuv-timer scheduler of a LockSession's lease timers: when
// an entry fires (within a tick of its time), that a stale or dropped entry never fires, and
// that an owner rescheduling from its firing is fired on a later pass, not in the same one.
import CUV
import Testing
@testable import DflockdClient

@Suite("TickTimersTests", .timeLimit(.minutes(1)))
struct TickTimersTests {
    /// An owner that records the loop time of each firing and may reschedule itself.
    final class Owner: TickTimerOwner, @unchecked Sendable {
        var tickTimerGeneration: UInt32 = 0
        var firedAtMs: [UInt64] = []
        var onFire: ((Owner) -> Void)?
        let loop: EventLoop

        init(loop: EventLoop) { self.loop = loop }

        func tickTimerFired() {
            firedAtMs.append(loop.nowMs)
            onFire?(self)
        }

        func schedule(on timers: TickTimers<Owner>, afterMs: Int) {
            tickTimerGeneration &+= 1
            timers.schedule(self, generation: tickTimerGeneration, afterMilliseconds: afterMs)
        }
    }

    /// Runs `body` on the loop thread and waits until it calls `done`.
    private func onLoop(_ loop: EventLoop, _ body: @escaping @Sendable (_ done: @escaping @Sendable () -> Void) -> Void) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            loop.execute { body { continuation.resume() } }
        }
    }

    @Test("an entry fires within one tick of its time; a rescheduled owner's old entry and a cancelled one never fire")
    func firesOnTimeAndSkipsStaleEntries() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let timers = UncheckedSendable(TickTimers<Owner>(loop: loop, tickMs: 8))
        let results = ThreadLock<(last: Owner?, rescheduled: Owner?, cancelled: Owner?, scheduledAtMs: UInt64)>((nil, nil, nil, 0))
        await onLoop(loop) { done in
            let timers = timers.value
            uv_update_time(loop.raw)
            let rescheduled = Owner(loop: loop)
            rescheduled.schedule(on: timers, afterMs: 20)
            rescheduled.schedule(on: timers, afterMs: 120)   // the 20 ms entry is stale now
            let cancelled = Owner(loop: loop)
            cancelled.schedule(on: timers, afterMs: 30)
            cancelled.tickTimerGeneration &+= 1               // cancelled
            let last = Owner(loop: loop)
            last.onFire = { _ in done() }
            last.schedule(on: timers, afterMs: 150)
            results.withLock { $0 = (last, rescheduled, cancelled, loop.nowMs) }
        }
        let (last, rescheduled, cancelled, scheduledAtMs) = results.withLock { $0 }
        await onLoop(loop) { done in done() }
        let rescheduledFirings = rescheduled?.firedAtMs ?? []
        #expect(cancelled?.firedAtMs == [], "a cancelled entry fired")
        #expect(rescheduledFirings.count == 1, "the stale entry of a rescheduled owner fired: \(rescheduledFirings)")
        if let firing = rescheduledFirings.first {
            #expect(firing + 8 >= scheduledAtMs + 120, "fired more than a tick early")
        }
        if let firing = last?.firedAtMs.first {
            #expect(firing + 8 >= scheduledAtMs + 150, "fired more than a tick early")
        }
        await onLoop(loop) { done in
            #expect(timers.value.entryCount == 0, "fired and stale entries are gone")
            done()
        }
    }

    @Test("an owner that reschedules itself from its firing, due at once, fires again on a later tick")
    func reschedulingFromAFiringWaitsForTheNextTick() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let timers = UncheckedSendable(TickTimers<Owner>(loop: loop, tickMs: 8))
        let owner = UncheckedSendable(Owner(loop: loop))
        await onLoop(loop) { done in
            owner.value.onFire = { owner in
                if owner.firedAtMs.count == 4 { done() } else { owner.schedule(on: timers.value, afterMs: 0) }
            }
            owner.value.schedule(on: timers.value, afterMs: 0)
        }
        let ticks = owner.value.firedAtMs.map { $0 / 8 }
        #expect(ticks.count == 4)
        #expect(zip(ticks, ticks.dropFirst()).allSatisfy { $0 < $1 }, "two firings in one tick: \(owner.value.firedAtMs)")
    }

    @Test("an owner dropped with an entry scheduled goes away; its entry fires nothing")
    func droppedOwnerIsNotKeptAlive() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let timers = UncheckedSendable(TickTimers<Owner>(loop: loop, tickMs: 8))
        let dropped = ThreadLock<Bool>(false)
        let witness = UncheckedSendable(Owner(loop: loop))
        await onLoop(loop) { done in
            weak var weakOwner: Owner?
            do {
                let owner = Owner(loop: loop)
                weakOwner = owner
                owner.schedule(on: timers.value, afterMs: 10)
            }
            dropped.withLock { $0 = weakOwner == nil }
            witness.value.onFire = { _ in done() }
            witness.value.schedule(on: timers.value, afterMs: 40)
        }
        #expect(dropped.withLock { $0 }, "the scheduled entry kept its owner alive")
    }
}
