"""Loss accounting from message numbers: gaps counted per run and rank, restarts and
daemon restarts without false gaps, schema 1 senders counted apart, state bounded."""

from __future__ import annotations

from daemon_support import exposition, goodbye, heartbeat, hello, host_seed, parse

from esper_telemetry.daemon.sequence import Sequences


def numbered(event, seq):
    return event._replace(seq=seq)


def lost_of(agg):
    s = parse(exposition(agg))
    return {
        dict(labels)["run"] + "/" + dict(labels)["rank"]: v
        for (name, labels), v in s.items()
        if name == "esper_messages_lost_total"
    }


def test_gaps_are_counted_per_run_and_rank(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([numbered(hello(world_size=2), 0), numbered(host_seed(step=1), 0)], clock())
    agg.apply_batch([numbered(host_seed(step=2), 1)], clock())
    agg.apply_batch([numbered(host_seed(step=5), 4)], clock())  # 2 and 3 never came
    agg.apply_batch([numbered(hello(rank=1, world_size=2), 0)], clock())
    agg.apply_batch([numbered(heartbeat(rank=1), 10)], clock())  # 1..9 never came
    agg.apply_batch([numbered(heartbeat(rank=1), 11)], clock())
    assert lost_of(agg) == {"r/0": 2, "r/1": 9}


def test_a_restarted_collector_starts_a_new_sequence_without_a_false_gap(make_agg, clock):
    agg, _ = make_agg()
    for seq in range(50):
        agg.apply_batch([numbered(heartbeat(), seq)], clock())
    agg.apply_batch([numbered(hello(), 0)], clock())  # the new process's Hello
    agg.apply_batch([numbered(heartbeat(), 1)], clock())
    assert lost_of(agg) == {"r/0": 0}
    # A restart whose first messages were lost: the numbers below the first seen count.
    agg.apply_batch([numbered(heartbeat(), 0)], clock())
    agg.apply_batch([numbered(heartbeat(), 3)], clock())
    agg.apply_batch([numbered(hello(), 0)], clock())
    agg.apply_batch([numbered(heartbeat(), 4)], clock())  # 1..3 of the third process
    assert lost_of(agg) == {"r/0": 2 + 3}


def test_the_first_message_seen_is_the_baseline(make_agg, clock):
    # A daemon that starts (or restarts) while the job runs cannot know what a previous
    # process received: nothing before the first number it sees is counted.
    agg, _ = make_agg()
    agg.apply_batch([numbered(heartbeat(), 123_456)], clock())
    agg.apply_batch([numbered(heartbeat(), 123_457)], clock())
    assert lost_of(agg) == {"r/0": 0}


def test_unnumbered_senders_are_counted_apart_and_never_as_lost(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(), host_seed()], clock())
    agg.apply_batch([heartbeat()], clock())
    s = parse(exposition(agg))
    assert s[("esper_daemon_unsequenced_messages_total", ())] == 2
    assert not any(name == "esper_messages_lost_total" for name, _ in s)


def test_refused_runs_leave_no_state_and_gone_runs_are_forgotten(make_agg, clock):
    agg, _ = make_agg(max_runs=2, ended_retention_s=0.0)
    for i in range(5):
        agg.apply_batch([numbered(host_seed(run=f"r{i}"), 0)], clock())
    # Only the runs the aggregator holds are tracked, whatever admission decided.
    held = {k.split("/")[0] for k in lost_of(agg)}
    assert len(held) <= 2
    assert len(agg.sequences._runs) <= 4  # bounded at twice the run cap
    for run in list(agg.sequences._runs):
        agg.apply_batch([numbered(goodbye(run=run), 1)], clock())
    agg.sequences.forget_gone()
    assert agg.sequences._runs == {} and lost_of(agg) == {}


def test_ranks_are_capped():
    seq = Sequences(lambda run, rank: True, max_runs=1, max_ranks_per_run=3)
    for rank in range(10):
        seq.observe([numbered(heartbeat(rank=rank), 5)])
        seq.observe([numbered(heartbeat(rank=rank), 7)])
    assert seq.lost() == {("r", 0): 1, ("r", 1): 1, ("r", 2): 1}


def test_a_run_that_expired_and_comes_back_counts_its_losses_from_zero(make_agg, clock):
    agg, _ = make_agg(ttl_s=5.0)
    agg.apply_batch([numbered(host_seed(step=0), 0)], clock())
    agg.apply_batch([numbered(host_seed(step=5), 5)], clock())  # 1..4 never came
    assert lost_of(agg) == {"r/0": 4}
    clock.advance(100.0)
    agg.tick(clock())  # the run expires
    assert lost_of(agg) == {}
    # The same name again (a job restarted under a fixed run name): its first message is
    # the baseline, as for any run this daemon sees first; before, 94 "lost" were counted.
    agg.apply_batch([numbered(host_seed(step=100), 100)], clock())
    assert lost_of(agg) == {"r/0": 0}


def test_an_evicted_run_that_comes_back_counts_from_zero(make_agg, clock):
    agg, _ = make_agg(max_runs=1, evict_after_s=0.0)
    agg.apply_batch([numbered(host_seed(run="a"), 0)], clock())
    agg.apply_batch([numbered(host_seed(run="a", step=2), 2)], clock())  # 1 lost
    clock.advance(1.0)
    agg.apply_batch([numbered(host_seed(run="b"), 0)], clock())  # takes a's place
    clock.advance(1.0)
    agg.apply_batch([numbered(host_seed(run="a", step=9), 9)], clock())  # takes b's
    assert lost_of(agg) == {"a/0": 0}


def test_a_rank_the_run_dropped_makes_room_for_a_new_one_and_a_refused_rank_leaves_nothing(
    make_agg, clock
):
    agg, stats = make_agg(max_ranks_per_run=2, ttl_s=10.0)
    agg.apply_batch([numbered(host_seed(rank=0), 0)], clock())
    agg.apply_batch([numbered(host_seed(rank=1), 0)], clock())
    agg.apply_batch([numbered(host_seed(rank=3), 0)], clock())  # refused: the run has 2 ranks
    assert stats.overflow["ranks"] == 1
    assert lost_of(agg) == {"r/0": 0, "r/1": 0}
    clock.advance(8.0)
    agg.apply_batch([numbered(host_seed(rank=0, step=2), 1)], clock())
    clock.advance(7.0)
    agg.tick(clock())  # rank 1 quiet past the TTL: the run lets it go
    agg.apply_batch([numbered(host_seed(rank=2), 0)], clock())
    agg.apply_batch([numbered(host_seed(rank=2, step=6), 5)], clock())  # 1..4 never came
    assert lost_of(agg)["r/2"] == 4  # before: rank 1's stale entry kept rank 2 unaccounted
    assert "r/3" not in lost_of(agg)
