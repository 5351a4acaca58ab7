"""run_sliced: work in slices a reactor turn apart."""

from __future__ import annotations

from twisted.trial import unittest

from vdsm_twisted.common.slicing import run_sliced


class Turns:
    """A reactor whose turns the test takes one at a time (task.Clock would
    run a callLater(0) scheduled during advance(0) in the same advance)."""

    def __init__(self):
        self.pending = []

    def callLater(self, delay, f, *args):
        self.pending.append((f, args))

    def advance(self, _=0):
        due, self.pending = self.pending, []
        for f, args in due:
            f(*args)


class RunSlicedTests(unittest.TestCase):
    def test_one_step_per_turn_with_no_budget_and_nothing_synchronous(self):
        clock = Turns()
        done = []
        d = run_sliced(clock, (done.append(i) for i in range(3)), budget=0)
        self.assertEqual(done, [])  # never in the caller's turn
        for expected in ([0], [0, 1], [0, 1, 2]):
            clock.advance(0)
            self.assertEqual(done, expected)
        self.assertNoResult(d)
        clock.advance(0)
        self.assertIsNone(self.successResultOf(d))

    def test_a_budget_takes_several_steps_per_turn(self):
        clock = Turns()
        done = []
        d = run_sliced(clock, (done.append(i) for i in range(100)), budget=60.0)
        clock.advance(0)
        self.assertEqual(len(done), 100)
        self.successResultOf(d)

    def test_a_failing_step_fails_the_whole(self):
        clock = Turns()

        def steps():
            yield
            raise ValueError("step 2")
        d = run_sliced(clock, steps(), budget=0)
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "step 2")
