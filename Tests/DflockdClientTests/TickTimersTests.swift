// Tests of `TickTimers`, the one-libuv-timer scheduler of a LockSession's lease timers: when
// an entry fires (within a tick of its time), that a stale, cancelled, freed or dropped entry
// never fires, and that an owner rescheduling from its firing is fired on a later pass.
import CUV
import Testing
@testable import DflockdClient

@Suite("TickTimersTests", .timeLimit(.minutes(1)))
struct TickTimersTests {
    /// An owner that records the loop time of each firing and may reschedule itself.
    final class Owner: TickTimerOwner, @unchecked Sendable {
        var firedAtMs: [UInt64] = []
        var onFire: ((Owner) -> Void)?
        /// Run as the owner goes: frees its slot, as the owner must.
        var freeOnDeinit: (() -> Void)?
        let loop: EventLoop

        init(loop: EventLoop) { self.loop = loop }

        deinit { freeOnDeinit?() }

        func tickTimerFired() {
            firedAtMs.append(loop.nowMs)
            onFire?(self)
        }
    }

    /// Runs `body` on the loop thread and waits until it calls `done`.
    private func onLoop(_ loop: EventLoop, _ body: @escaping @Sendable (_ done: @escaping @Sendable () -> Void) -> Void) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            loop.execute { body { continuation.resume() } }
        }
    }

    @Test("an entry fires within one tick of its time; a rescheduled slot's old entry, a cancelled and a freed one never fire")
    func firesOnTimeAndSkipsStaleEntries() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let timers = UncheckedSendable(TickTimers<Owner>(loop: loop, tickMs: 8))
        let owners = UncheckedSendable((rescheduled: Owner(loop: loop), cancelled: Owner(loop: loop), freed: Owner(loop: loop),
                                        reused: Owner(loop: loop), last: Owner(loop: loop)))
        let scheduledAtMs = ThreadLock<UInt64>(0)
        await onLoop(loop) { done in
            let timers = timers.value
            let owners = owners.value
            uv_update_time(loop.raw)
            scheduledAtMs.withLock { $0 = loop.nowMs }
            let rescheduled = timers.makeSlot(for: owners.rescheduled)
            timers.schedule(rescheduled, afterMilliseconds: 20)
            timers.schedule(rescheduled, afterMilliseconds: 120)   // the 20 ms entry is stale now
            let cancelled = timers.makeSlot(for: owners.cancelled)
            timers.schedule(cancelled, afterMilliseconds: 30)
            timers.cancel(cancelled)
            let freed = timers.makeSlot(for: owners.freed)
            timers.schedule(freed, afterMilliseconds: 40)
            timers.freeSlot(freed)
            // The freed slot, reused at once, does not inherit the pending entry.
            let reused = timers.makeSlot(for: owners.reused)
            #expect(reused == freed)
            owners.last.onFire = { _ in done() }
            timers.schedule(timers.makeSlot(for: owners.last), afterMilliseconds: 150)
        }
        let (rescheduled, cancelled, freed, reused, last) = owners.value
        let start = scheduledAtMs.withLock { $0 }
        #expect(cancelled.firedAtMs == [], "a cancelled entry fired")
        #expect(freed.firedAtMs == [] && reused.firedAtMs == [], "a freed slot's entry fired")
        #expect(rescheduled.firedAtMs.count == 1, "the stale entry of a rescheduled slot fired: \(rescheduled.firedAtMs)")
        for (owner, afterMs) in [(rescheduled, 120), (last, 150)] as [(Owner, UInt64)] {
            if let firing = owner.firedAtMs.first {
                #expect(firing + 8 >= start + afterMs, "fired more than a tick early")
            }
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
            let slot = timers.value.makeSlot(for: owner.value)
            owner.value.onFire = { owner in
                if owner.firedAtMs.count == 4 { done() } else { timers.value.schedule(slot, afterMilliseconds: 0) }
            }
            timers.value.schedule(slot, afterMilliseconds: 0)
        }
        let ticks = owner.value.firedAtMs.map { $0 / 8 }
        #expect(ticks.count == 4)
        #expect(zip(ticks, ticks.dropFirst()).allSatisfy { $0 < $1 }, "two firings in one tick: \(owner.value.firedAtMs)")
    }

    @Test("a slot does not keep its owner alive: an owner that frees its slot as it goes, with an entry scheduled, goes away and its entry fires nothing")
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
                let slot = timers.value.makeSlot(for: owner)
                timers.value.schedule(slot, afterMilliseconds: 10)
                // What a lock's driver does as it goes (LeaseDriver.tearDown).
                owner.freeOnDeinit = { timers.value.freeSlot(slot) }
            }
            dropped.withLock { $0 = weakOwner == nil }
            witness.value.onFire = { _ in done() }
            timers.value.schedule(timers.value.makeSlot(for: witness.value), afterMilliseconds: 40)
        }
        #expect(dropped.withLock { $0 }, "the scheduled entry kept its owner alive")
        #expect(witness.value.firedAtMs.count == 1)
    }
}
