import HeapModule

/// What ``TickTimers`` fires.
protocol TickTimerOwner: AnyObject {
    /// The owner's live timer came due.
    func tickTimerFired()
}

/// Many one-shot timers on one libuv timer, for the locks of a ``LockSession``.
///
/// A `uv_timer_t` per lock costs a handle and its wrapper (about 250 bytes), and with 100,000
/// locks every reschedule walks libuv's binary heap of all of them (O(log n) cache misses),
/// twice per renewal. Here a timer is an entry in the bucket of its *tick* (`tickMs` of the
/// loop's clock), and only the ticks that have entries are kept in order: a renewal due
/// every 10 s for 100,000 locks touches a bucket, not a heap of 100,000.
///
/// Precision: an entry fires at the start of the tick its time falls in, so up to one tick
/// early (the lease machine treats an early firing as a recomputation), except that an entry
/// due within the current tick goes to the next one, so up to one tick late: a firing never
/// schedules an entry that fires again in the same pass. Both are far below the lease's
/// safety margin (a tenth of the lease, at least 100 ms for a 1-second lease).
///
/// Each owner has a *slot* (``makeSlot(for:)``), which names its live timer by a generation.
/// Rescheduling and cancelling are O(1): the slot's generation moves on, and older entries (a
/// slot number and a generation, 8 bytes) are dropped unfired when their tick comes, without
/// touching their owner. A slot does not keep its owner alive, nor refer to it weakly (a weak
/// reference puts every retain and release of the owner on the runtime's slow path): the
/// owner must free its slot (``freeSlot(_:)``) on the loop before it goes. Loop thread only.
final class TickTimers<Owner: TickTimerOwner> {
    typealias Slot = UInt32

    private struct SlotState {
        /// Not kept alive: an owner frees its slot before it goes.
        unowned(unsafe) var owner: Owner?
        var generation: UInt32 = 0
    }

    private struct Entry {
        let slot: Slot
        let generation: UInt32
    }

    let tickMs: UInt64
    private let loop: EventLoop
    // Loop thread only. Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds: they were a tenth of a request's instructions (callgrind), only
    // the loop thread touches them, and debug builds, which the tests run, check every access.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var slots: [SlotState] = []
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var freeSlots: [Slot] = []
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var buckets: [UInt64: [Entry]] = [:]
    /// The ticks that have a bucket, earliest first.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var ticks = Heap<UInt64>()
    private var timer: LoopTimer?
    /// The tick the libuv timer is set for, while it is set.
    private var timerTick: UInt64?
    private var isClosed = false

    init(loop: EventLoop, tickMs: UInt64 = 8) {
        precondition(tickMs > 0)
        self.loop = loop
        self.tickMs = tickMs
    }

    /// Entries waiting to fire, stale ones included (for tests).
    var entryCount: Int { buckets.values.reduce(0) { $0 + $1.count } }

    /// A slot for `owner`'s timer, unscheduled.
    func makeSlot(for owner: Owner) -> Slot {
        loop.assertInLoop()
        if let slot = freeSlots.popLast() {
            slots[Int(slot)].owner = owner
            return slot
        }
        slots.append(SlotState(owner: owner))
        return Slot(slots.count - 1)
    }

    /// Gives the slot back (its owner is gone or needs it no more); a pending entry of it
    /// never fires.
    func freeSlot(_ slot: Slot) {
        loop.assertInLoop()
        guard !isClosed else { return }
        slots[Int(slot)].generation &+= 1
        slots[Int(slot)].owner = nil
        freeSlots.append(slot)
    }

    /// Fires the slot's owner about `milliseconds` from the loop's current time, replacing
    /// the slot's earlier schedule.
    func schedule(_ slot: Slot, afterMilliseconds milliseconds: Int) {
        loop.assertInLoop()
        guard !isClosed else { return }
        slots[Int(slot)].generation &+= 1
        let nowMs = loop.nowMs
        let dueTick = (nowMs + UInt64(max(0, milliseconds))) / tickMs
        let tick = max(dueTick, nowMs / tickMs + 1)
        let entry = Entry(slot: slot, generation: slots[Int(slot)].generation)
        if buckets[tick]?.append(entry) == nil {
            buckets[tick] = [entry]
            ticks.insert(tick)
        }
        settleTimer()
    }

    /// Unschedules the slot's timer.
    func cancel(_ slot: Slot) {
        guard !isClosed else { return }
        slots[Int(slot)].generation &+= 1
    }

    /// Closes the libuv timer; nothing fires any more. Idempotent.
    func close() {
        isClosed = true
        buckets.removeAll()
        ticks = Heap()
        timer?.close()
        timer = nil
        timerTick = nil
    }

    private func settleTimer() {
        guard let next = ticks.min else { return }
        if let timerTick, timerTick <= next { return }
        let timer = self.timer ?? LoopTimer(loop: loop) { [weak self] in self?.fire() }
        self.timer = timer
        let dueMs = next * tickMs
        let nowMs = loop.nowMs
        timer.schedule(afterMilliseconds: dueMs > nowMs ? Int(clamping: dueMs - nowMs) : 0)
        timerTick = next
    }

    private func fire() {
        timerTick = nil
        let currentTick = loop.nowMs / tickMs
        // The ticks due now, taken before any owner runs: what they schedule goes to later
        // ticks (see `schedule`), fired on a later pass.
        var due: [[Entry]] = []
        while let tick = ticks.min, tick <= currentTick {
            ticks.removeMin()
            if let entries = buckets.removeValue(forKey: tick) { due.append(entries) }
        }
        for entries in due {
            for entry in entries {
                guard !isClosed else { return }
                let index = Int(entry.slot)
                guard slots[index].generation == entry.generation, let owner = slots[index].owner else { continue }
                owner.tickTimerFired()
            }
        }
        settleTimer()
    }
}
