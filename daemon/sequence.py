"""Loss accounting: the gaps in each collector's message numbers.

ZeroMQ PUSH has no acknowledgements, so a collector cannot know what reached the daemon.
Instead it numbers its messages (schema 2: every event of a message carries the message's
``seq``; 0, 1, 2, ... from its ``Hello``), and the daemon counts, per run and rank, the
numbers it never applied. Whatever lost them (libzmq dropping a pipe at a reconnect, an
oversize frame, a full queue, a rejected message, a daemon restart while the job ran on)
then shows up as ``esper_messages_lost_total{run,rank}``.

The rules, per (run, rank), message by message in the order they are applied:

- The first message seen sets the baseline: what came before it (sent before this daemon
  started, or to a previous daemon process) is not known here, so it is not counted.
- The next number is the expected one; a higher number counts the numbers skipped.
- A lower number is a new sequence: the collector restarted (its ``Hello`` numbers 0, so a
  restart whose first message arrives counts nothing; if its first messages were lost, the
  numbers below the first one seen are counted).
- No count can outrun what a collector could have sent: per (run, rank) the losses counted
  draw on an allowance of ``BURST_MESSAGES`` that refills at ``MAX_MESSAGES_PER_S`` since
  that rank was last judged. A higher number past it (one message numbered 2**63-1 once
  set the counter to 9.2e18 and hid every later loss) is not believed: counted in
  ``implausible``, and the next message is judged against the number expected before it.
  A lower number past it starts a new sequence with nothing counted lost (and is counted
  in ``implausible`` too).
- Messages without a number (schema 1 senders) are only counted in ``unsequenced``.

State is bounded like the aggregator's: entries exist only for ranks of runs the aggregator
holds (``holds(run, rank)``, asked after the message was applied, so a refused run or rank
leaves nothing here), at most ``max_ranks_per_run`` ranks per run (at the cap, the entries
of ranks the run no longer holds make room), and entries of runs it no longer holds are
forgotten (``forget_gone``, also done by itself whenever more runs than twice ``max_runs``
are tracked). A run the aggregator creates anew (after it expired, was evicted or ended)
starts again from zero, as its other counters do: the aggregator calls ``forget`` then.
Single-threaded, on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from esper_telemetry.events import Event

__all__ = ["Sequences", "MAX_MESSAGES_PER_S", "BURST_MESSAGES"]

# More than any collector sends: the daemon itself takes well under a million messages a
# second from all its collectors together (bench/RESULTS.md).
MAX_MESSAGES_PER_S = 1_000_000
# Losses believed at once, before the allowance refills: more than libzmq ever drops in one
# go (a reconnect discards a pipe of at most the receive and send high-water marks).
BURST_MESSAGES = 1 << 20


class Sequences:
    """Per (run, rank): the next message number expected and the messages lost so far."""

    __slots__ = ("_holds", "_max_runs", "_max_ranks", "_runs", "unsequenced", "implausible")

    def __init__(
        self, holds: Callable[[str, int | None], bool], max_runs: int, max_ranks_per_run: int
    ) -> None:
        # holds(run, None): the aggregator holds the run; holds(run, rank): and that rank.
        self._holds = holds
        self._max_runs = max_runs
        self._max_ranks = max_ranks_per_run
        # run -> rank -> [next expected seq, lost, allowance, when the allowance was taken]
        self._runs: dict[str, dict[int, list]] = {}
        self.unsequenced = 0  # messages applied that carried no number (schema 1)
        self.implausible = 0  # messages whose number jumped further than could be

    def observe(self, events: Sequence[Event], now: float = 0.0) -> None:
        """Account for one applied message (its events, all from one sender by the codec)."""
        first = events[0]
        self.observe_message(first[0], first[1], first[-1], now)

    def observe_message(self, run: str, rank: int, seq: int | None, now: float = 0.0) -> None:
        """Account for one applied message from ``run``'s ``rank``, numbered ``seq`` (None:
        schema 1), at ``now`` (monotonic seconds)."""
        if seq is None:
            self.unsequenced += 1
            return
        ranks = self._runs.get(run)
        entry = None if ranks is None else ranks.get(rank)
        if entry is None:
            holds = self._holds
            if not holds(run, rank):
                return
            if ranks is None:
                if len(self._runs) >= 2 * self._max_runs:
                    self.forget_gone()
                ranks = self._runs[run] = {}
            if len(ranks) >= self._max_ranks:
                for gone in [r for r in ranks if not holds(run, r)]:
                    del ranks[gone]
            if len(ranks) < self._max_ranks:
                ranks[rank] = [seq + 1, 0, BURST_MESSAGES, now]
            return
        expected = entry[0]
        if seq == expected:
            entry[0] = seq + 1
            return
        # Skipped numbers are lost; a lower number is a restart, lost below it. Either only
        # as far as the allowance reaches.
        elapsed = now - entry[3]
        allowance = min(BURST_MESSAGES, entry[2] + MAX_MESSAGES_PER_S * max(elapsed, 0.0))
        entry[3] = now
        lost = seq - expected if seq > expected else seq
        if lost <= allowance:
            entry[1] += lost
            entry[2] = allowance - lost
            entry[0] = seq + 1
            return
        entry[2] = allowance
        self.implausible += 1
        if seq < expected:
            entry[0] = seq + 1  # a new sequence, its first numbers not counted

    def observe_messages(
        self, run: str, rank: int, seqs: Sequence[int | None], now: float = 0.0
    ) -> None:
        """``observe_message`` for each of ``seqs``, in order; numbers that follow on from
        one another (a collector's) in one step."""
        first = seqs[0]
        n = len(seqs)
        if first is None or tuple(seqs) != tuple(range(first, first + n)):
            for seq in seqs:
                self.observe_message(run, rank, seq, now)
            return
        self.observe_message(run, rank, first, now)
        ranks = self._runs.get(run)
        entry = None if ranks is None else ranks.get(rank)
        if entry is None:
            return  # not held: nor would the others be
        if entry[0] == first + 1:
            entry[0] = first + n
        else:  # the first was not believed: the others judged one by one
            for seq in seqs[1:]:
                self.observe_message(run, rank, seq, now)

    def forget(self, run: str) -> None:
        """Drop ``run``'s entries: the aggregator created it anew, so it counts from zero."""
        self._runs.pop(run, None)

    def forget_gone(self) -> None:
        """Drop the entries of runs the aggregator no longer holds."""
        holds = self._holds
        for run in [r for r in self._runs if not holds(r, None)]:
            del self._runs[run]

    def lost(self) -> dict[tuple[str, int], int]:
        """Messages lost so far per (run, rank) of every run held, detached."""
        holds = self._holds
        return {
            (run, rank): entry[1]
            for run, ranks in self._runs.items()
            if holds(run, None)
            for rank, entry in ranks.items()
        }
