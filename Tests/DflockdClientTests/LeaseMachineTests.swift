import Testing
@testable import DflockdClient

/// The lock's state machine driven by events alone: no socket, no timer, no loop. Every test
/// compares whole action lists.
@Suite struct LeaseMachineTests {
    private let grant = Grant(token: "4c6af3c93c83e0aa6ca56449a1d1c83f", leaseS: 20)
    private let lostConnection = LockError.connectionClosed(reason: "EOF")

    private func call(_ raw: UInt64) -> LeaseMachine.CallID { LeaseMachine.CallID(raw: raw) }

    /// Held through `acquire` (call 1) on session 1, granted for a request sent at 1 s.
    private func heldMachine(acquireTimeoutS: Int = 10) -> LeaseMachine {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: acquireTimeoutS, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        _ = machine.handle(.answered(1, .acquire(timeoutS: acquireTimeoutS), .granted(grant), sentAtMs: 1_000))
        return machine
    }

    /// Enqueued (call 1) on session 1 behind another holder.
    private func queuedMachine() -> LeaseMachine {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.enqueueRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        _ = machine.handle(.answered(1, .enqueue, .queued, sentAtMs: 0))
        return machine
    }

    @Test func acquireWalksIdleConnectingQueuedHeld() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 7, renewRatio: 0.5)
        #expect(machine.publicState == .idle)
        #expect(machine.handle(.acquireRequested(call(1), force: false)) == [.openConnection(1), .stateChanged(.connecting)])
        #expect(machine.handle(.connected(1)) == [.send(1, .acquire(timeoutS: 7)), .stateChanged(.queued)])
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 7), .granted(grant), sentAtMs: 1_000)) == [
            .scheduleTimer(1, afterMs: 10_000), .complete(call(1), .acquire, .granted), .stateChanged(.held),
        ])
        #expect(machine.holding?.grant == grant)
        // 1 s + 20 s, less the safety margin: a tenth of the lease, at most 1 s.
        #expect(machine.holding?.deadlineMs == 20_000)
    }

    @Test func timeoutClosesTheSessionAndReportsFalse() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 1, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 1), .timeout, sentAtMs: 0)) == [
            .closeConnection(1), .complete(call(1), .acquire, .timedOut), .stateChanged(.closed),
        ])
        // Reusable: a new acquire starts over on a new session.
        #expect(machine.handle(.acquireRequested(call(2), force: false)) == [.openConnection(2), .stateChanged(.connecting)])
    }

    @Test func acquireWhileConnectedIsRejectedUnlessForced() {
        var machine = heldMachine()
        #expect(machine.handle(.acquireRequested(call(2), force: false)) == [.complete(call(2), .acquire, .failed(.alreadyConnected(key: "job")))])
        #expect(machine.publicState == .held)
        #expect(machine.handle(.acquireRequested(call(3), force: true)) == [
            .cancelTimer, .closeConnection(1), .openConnection(2), .stateChanged(.connecting),
        ])
    }

    /// Issue #13 item 3: the old session's failures, delivered after the forced restart, are
    /// stale by their session number and leave the new operation alone.
    @Test func aForcedRestartIgnoresTheOldSessionsEvents() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.acquireRequested(call(2), force: true)) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .acquire, .failed(.closed)), .openConnection(2),
            .stateChanged(.connecting),
        ])
        #expect(machine.handle(.failed(1, .acquire(timeoutS: 5), .closed)) == [])
        #expect(machine.handle(.failed(1, nil, lostConnection)) == [])
        #expect(machine.handle(.connected(2)) == [.send(2, .acquire(timeoutS: 5)), .stateChanged(.queued)])
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 5), .granted(grant), sentAtMs: 0)) == [])
        #expect(machine.handle(.answered(2, .acquire(timeoutS: 5), .granted(grant), sentAtMs: 0)) == [
            .scheduleTimer(2, afterMs: 10_000), .complete(call(2), .acquire, .granted), .stateChanged(.held),
        ])
    }

    @Test func aForcedEnqueueWhileHeldEndsTheLeaseAndStartsOver() {
        var machine = heldMachine()
        #expect(machine.handle(.enqueueRequested(call(2), force: true)) == [
            .cancelTimer, .closeConnection(1), .openConnection(2), .stateChanged(.connecting),
        ])
        #expect(machine.handle(.timerFired(1, nowMs: 11_000)) == [])
        #expect(machine.handle(.connected(2)) == [.send(2, .enqueue), .stateChanged(.queued)])
    }

    @Test func renewalUpdatesLeaseAndDeadlineAndReschedules() {
        var machine = heldMachine()
        // Granted at 1 s with 20 s: renew at 11 s, and wait for the answer until 20 s at most
        // (21 s less the 1 s margin).
        #expect(machine.handle(.timerFired(1, nowMs: 11_000)) == [.send(1, .renew(token: grant.token)), .scheduleTimer(1, afterMs: 9_000)])
        // A tick while the renewal is in flight sends nothing more.
        #expect(machine.handle(.timerFired(1, nowMs: 15_000)) == [.scheduleTimer(1, afterMs: 5_000)])
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 8), sentAtMs: 11_000)) == [.scheduleTimer(1, afterMs: 4_000)])
        #expect(machine.holding?.leaseS == 8)
        // 11 s + 8 s, less 0.8 s.
        #expect(machine.holding?.deadlineMs == 18_200)
    }

    @Test func unansweredRenewalLosesTheLockAtTheLocalDeadline() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        #expect(machine.handle(.timerFired(1, nowMs: 19_999)) == [.scheduleTimer(1, afterMs: 1)])
        #expect(machine.handle(.timerFired(1, nowMs: 20_000)) == [
            .cancelTimer, .closeConnection(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
        // The renewal's answer, arriving after all, is stale.
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 20), sentAtMs: 11_000)) == [])
    }

    /// The server starts the lease when it reads the request, after we sent it; a timer only
    /// ever fires late. The margin keeps the loss ahead of the earliest server-side expiry.
    @Test func theLocalDeadlineKeepsASafetyMarginBeforeTheLeaseEnds() {
        func deadline(leaseS: Int, renewRatio: Double = 0.5, maxIdleMs: Int? = nil) -> UInt64? {
            var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: renewRatio, maxIdleMs: maxIdleMs)
            _ = machine.handle(.acquireRequested(call(1), force: false))
            _ = machine.handle(.connected(1))
            _ = machine.handle(.answered(1, .acquire(timeoutS: 10), .granted(Grant(token: grant.token, leaseS: leaseS)), sentAtMs: 0))
            return machine.holding?.deadlineMs
        }
        #expect(deadline(leaseS: 33) == 32_000, "a tenth of the lease, at most 1 s")
        #expect(deadline(leaseS: 3) == 2_700)
        #expect(deadline(leaseS: 1) == 900)
        #expect(deadline(leaseS: 60, maxIdleMs: 10_000) == 59_000)
        // The renewal keeps at least as much time to be answered as the margin takes.
        #expect(deadline(leaseS: 1, renewRatio: 0.95) == 975)
        #expect(deadline(leaseS: 0) == 0)
        #expect(LeaseMachine.safetyMarginMs(leaseMs: 3_000, renewalDelayMs: 1_500) == 300)
        #expect(LeaseMachine.safetyMarginMs(leaseMs: 1_000, renewalDelayMs: 1_000) == 0)
    }

    @Test func aLateTimerPastTheDeadlineLosesTheLockWithoutRenewing() {
        var machine = heldMachine()
        #expect(machine.handle(.timerFired(1, nowMs: 30_000)) == [
            .cancelTimer, .closeConnection(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func maxIdleCapsTheRenewalInterval() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5, maxIdleMs: 10_000)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        let long = Grant(token: grant.token, leaseS: 60)
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 10), .granted(long), sentAtMs: 0)) == [
            .scheduleTimer(1, afterMs: 10_000), .complete(call(1), .acquire, .granted), .stateChanged(.held),
        ])
        _ = machine.handle(.timerFired(1, nowMs: 10_000))
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 60), sentAtMs: 10_000)) == [.scheduleTimer(1, afterMs: 10_000)])
        // A short lease still renews by the ratio.
        var short = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5, maxIdleMs: 10_000)
        _ = short.handle(.acquireRequested(call(1), force: false))
        _ = short.handle(.connected(1))
        #expect(short.handle(.answered(1, .acquire(timeoutS: 10), .granted(Grant(token: grant.token, leaseS: 4)), sentAtMs: 0)) == [
            .scheduleTimer(1, afterMs: 2_000), .complete(call(1), .acquire, .granted), .stateChanged(.held),
        ])
    }

    @Test func failedRenewalLosesTheLockOnceAndLeavesItReusable() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notHeld(key: "job"))) == [
            .cancelTimer, .closeConnection(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
        // The connection's own close report arrives next and is stale.
        #expect(machine.handle(.failed(1, nil, lostConnection)) == [])
        // release() then says what happened, once.
        #expect(machine.handle(.releaseRequested(call(2))) == [.complete(call(2), .release, .failed(.lockLost(key: "job", token: grant.token)))])
        #expect(machine.handle(.releaseRequested(call(3))) == [.complete(call(3), .release, .failed(.notConnected(key: "job")))])
        #expect(machine.handle(.acquireRequested(call(4), force: false)) == [.openConnection(2), .stateChanged(.connecting)])
    }

    @Test func connectionLostWhileHeldReportsTheLoss() {
        var machine = heldMachine()
        #expect(machine.handle(.failed(1, nil, lostConnection)) == [
            .cancelTimer, .closeConnection(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func releaseSendsReleaseThenCloses() {
        var machine = heldMachine()
        #expect(machine.handle(.releaseRequested(call(2))) == [
            .cancelTimer, .send(1, .release(token: grant.token)), .stateChanged(.releasing),
        ])
        #expect(machine.handle(.releaseRequested(call(3))) == [.complete(call(3), .release, .failed(.operationInProgress(key: "job")))])
        // A renewal that crossed the release is answered first and changes nothing.
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 20), sentAtMs: 0)) == [])
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notHeld(key: "job"))) == [])
        #expect(machine.handle(.answered(1, .release(token: grant.token), .ok, sentAtMs: 0)) == [
            .closeConnection(1), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
        #expect(machine.handle(.releaseRequested(call(4))) == [.complete(call(4), .release, .failed(.notConnected(key: "job")))])
    }

    @Test func releaseWhoseConnectionClosedSucceeds() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested(call(2)))
        #expect(machine.handle(.failed(1, .release(token: grant.token), .connectionClosed(reason: "reset"))) == [
            .closeConnection(1), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    /// A release nobody answered may not have reached the server: it fails, saying the key is
    /// free at the latest when the lease ends.
    @Test func releaseTheServerDidNotConfirmFails() {
        for error in [LockError.socketTimeout(milliseconds: 500), .protocolViolation("garbage")] {
            var machine = heldMachine()
            _ = machine.handle(.releaseRequested(call(2)))
            #expect(machine.handle(.failed(1, .release(token: grant.token), error)) == [
                .closeConnection(1), .complete(call(2), .release, .failed(.releaseUnconfirmed(key: "job", leaseS: 20))), .stateChanged(.closed),
            ])
        }
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested(call(2)))
        #expect(machine.handle(.failed(1, nil, .eventLoopShutDown)) == [
            .closeConnection(1), .complete(call(2), .release, .failed(.eventLoopShutDown)), .stateChanged(.closed),
        ])
        #expect(LockError.releaseUnconfirmed(key: "job", leaseS: 20).description.contains("at the latest when its lease ends"))
    }

    @Test func releaseRefusedByTheServerReportsNotHeld() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested(call(2)))
        #expect(machine.handle(.failed(1, .release(token: grant.token), .notHeld(key: "job"))) == [
            .closeConnection(1), .complete(call(2), .release, .failed(.notHeld(key: "job"))), .stateChanged(.closed),
        ])
    }

    @Test func releaseOnNeverConnectedInstanceIsRejected() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 1, renewRatio: 0.5)
        #expect(machine.handle(.releaseRequested(call(1))) == [.complete(call(1), .release, .failed(.notConnected(key: "job")))])
    }

    @Test func releaseWhileQueuedLeavesTheQueue() {
        var machine = queuedMachine()
        #expect(machine.handle(.releaseRequested(call(2))) == [
            .cancelTimer, .closeConnection(1), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    @Test func twoPhaseFastPathHoldsAndWaitIsTrueAtOnce() {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.enqueueRequested(call(1), force: false))
        #expect(machine.handle(.connected(1)) == [.send(1, .enqueue), .stateChanged(.queued)])
        #expect(machine.handle(.answered(1, .enqueue, .granted(grant), sentAtMs: 0)) == [
            .scheduleTimer(1, afterMs: 10_000), .complete(call(1), .enqueue, .granted), .stateChanged(.held),
        ])
        #expect(machine.handle(.waitRequested(call(2), timeoutS: 3)) == [.complete(call(2), .wait, .granted)])
    }

    /// Issue #13 item 1: a grant found by `w` may have started on the server long before; it is
    /// confirmed by a renewal, and the deadline counts from that renewal.
    @Test func aGrantFoundByWaitIsConfirmedByARenewalBeforeItIsHeld() {
        var machine = queuedMachine()
        #expect(machine.publicState == .queued)
        #expect(machine.handle(.waitRequested(call(2), timeoutS: 3)) == [.send(1, .wait(timeoutS: 3))])
        #expect(machine.handle(.waitRequested(call(3), timeoutS: 3)) == [.complete(call(3), .wait, .failed(.operationInProgress(key: "two")))])
        #expect(machine.handle(.answered(1, .wait(timeoutS: 3), .granted(grant), sentAtMs: 50_000)) == [.send(1, .renew(token: grant.token))])
        #expect(machine.publicState == .queued)
        #expect(machine.holding == nil)
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 20), sentAtMs: 51_000)) == [
            .scheduleTimer(1, afterMs: 10_000), .complete(call(2), .wait, .granted), .stateChanged(.held),
        ])
        #expect(machine.holding?.deadlineMs == 70_000)
    }

    @Test func aLateGrantWhoseRenewalIsRefusedIsNotHeld() {
        var machine = queuedMachine()
        _ = machine.handle(.waitRequested(call(2), timeoutS: 3))
        _ = machine.handle(.answered(1, .wait(timeoutS: 3), .granted(grant), sentAtMs: 0))
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notHeld(key: "two"))) == [
            .closeConnection(1), .complete(call(2), .wait, .failed(.leaseExpired(key: "two"))), .stateChanged(.closed),
        ])
        #expect(machine.handle(.failed(1, nil, lostConnection)) == [])
    }

    @Test func waitDefaultsToTheAcquireTimeoutAndValidatesItsOwn() {
        var machine = queuedMachine()
        #expect(machine.handle(.waitRequested(call(2), timeoutS: -1)) == [
            .complete(call(2), .wait, .failed(.invalidArgument(name: "timeoutS", reason: "must be 0 or more seconds, got -1"))),
        ])
        #expect(machine.handle(.waitRequested(call(3), timeoutS: nil)) == [.send(1, .wait(timeoutS: 5))])
        #expect(machine.handle(.answered(1, .wait(timeoutS: 5), .timeout, sentAtMs: 0)) == [
            .closeConnection(1), .complete(call(3), .wait, .timedOut), .stateChanged(.closed),
        ])
    }

    @Test func waitBeforeEnqueueIsRejected() {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        #expect(machine.handle(.waitRequested(call(1), timeoutS: 1)) == [.complete(call(1), .wait, .failed(.notEnqueued(key: "two")))])
    }

    @Test func closeFailsTheOperationInFlightAndIsIdempotent() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        #expect(machine.handle(.closeRequested) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .acquire, .failed(.closed)), .stateChanged(.closed),
        ])
        #expect(machine.handle(.closeRequested) == [])
    }

    @Test func closeWhileReleasingCompletesTheRelease() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested(call(2)))
        #expect(machine.handle(.closeRequested) == [
            .cancelTimer, .closeConnection(1), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    @Test func cancelActsOnlyOnTheCallInFlight() {
        var held = heldMachine()
        // The acquire (call 1) completed: its cancellation came too late and changes nothing.
        #expect(held.handle(.cancelRequested(call(1))) == [])
        // A release is never cancelled.
        _ = held.handle(.releaseRequested(call(2)))
        #expect(held.handle(.cancelRequested(call(2))) == [])
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.cancelRequested(call(9))) == [])
        #expect(machine.handle(.cancelRequested(call(1))) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .acquire, .failed(.cancelled)), .stateChanged(.closed),
        ])
    }

    @Test func cancellingAWaitClosesTheSessionEvenWhileVerifying() {
        var machine = queuedMachine()
        _ = machine.handle(.waitRequested(call(2), timeoutS: 3))
        _ = machine.handle(.answered(1, .wait(timeoutS: 3), .granted(grant), sentAtMs: 0))
        #expect(machine.handle(.cancelRequested(call(2))) == [
            .cancelTimer, .closeConnection(1), .complete(call(2), .wait, .failed(.cancelled)), .stateChanged(.closed),
        ])
    }

    @Test func serverRefusalFailsTheAcquire() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.failed(1, .acquire(timeoutS: 5), .maxLocks(key: "job"))) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .acquire, .failed(.maxLocks(key: "job"))), .stateChanged(.closed),
        ])
    }

    @Test func aConnectFailureFailsTheCall() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.enqueueRequested(call(1), force: false))
        let refused = LockError.connectFailed(host: "127.0.0.1", port: 1, reason: "refused")
        #expect(machine.handle(.failed(1, nil, refused)) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .enqueue, .failed(refused)), .stateChanged(.closed),
        ])
    }

    @Test func staleRepliesAfterCloseAreIgnored() {
        var machine = heldMachine()
        _ = machine.handle(.closeRequested)
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 10), .granted(grant), sentAtMs: 0)) == [])
        #expect(machine.handle(.answered(1, .renew(token: grant.token), .renewed(remainingS: 5), sentAtMs: 0)) == [])
        #expect(machine.handle(.timerFired(1, nowMs: 11_000)) == [])
        #expect(machine.handle(.failed(1, nil, lostConnection)) == [])
        #expect(machine.handle(.connected(1)) == [])
    }
}

@Suite struct ShardingTests {
    /// The vectors of protocol.md: every official client must agree on placement.
    @Test(arguments: [
        ("my-resource", UInt32(1_352_043_018), [0, 0, 0, 3, 4]),
        ("a", UInt32(3_904_355_907), [0, 1, 0, 2, 4]),
        ("bench-0", UInt32(2_530_901_313), [0, 1, 0, 3, 3]),
        ("clé-锁", UInt32(3_873_615_673), [0, 1, 1, 3, 4]),
        ("orders/42", UInt32(370_287_966), [0, 0, 0, 1, 6]),
    ])
    func stableHashShardMatchesProtocolVectors(key: String, crc: UInt32, indices: [Int]) {
        #expect(crc32(key.utf8) == crc)
        #expect([1, 2, 3, 5, 7].map { stableHashShard(key, $0) } == indices)
    }
}
