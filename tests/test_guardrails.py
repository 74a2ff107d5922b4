"""Guardrails against silent errors, on hand-made inputs: the weight-sync checksum comparison and
the generator/learner log-prob gap (warn, then stop), skipped updates in a row (stop). The real syncs compare checksums in
tests/test_sync.py."""

import doctest

from rlsys.actors import weight_sync
from rlsys.cluster import groups
from rlsys.loops import train


def test_checksums_and_their_comparison():
    assert doctest.testmod(weight_sync).failed == 0  # checksum
    assert doctest.testmod(groups).failed == 0  # check_received


def test_logprob_gap_warns_then_stops_and_bad_steps_in_a_row_stop():
    assert doctest.testmod(train).failed == 0  # check_logprob_gap, check_bad_steps


def test_chunk_seeds_depend_on_the_chunk_not_on_the_engine():
    from rlsys.cluster import pool

    assert doctest.testmod(pool).failed == 0  # chunk_seed (and chunk_size)
