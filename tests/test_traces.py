"""Rejection sampling's selection (rlsys.data.traces) on hand-made samples, and the file it writes."""

import pyarrow.parquet as pq
import pytest

from rlsys.data.traces import Candidate, Filters, jaccard, read_provenance, select, shingles, write

GOOD = "<think> 2 plus 3 is 5 because we count on from two </think> <answer> 5 </answer>"


def cand(prompt: int, response: str, accuracy: float = 1.0, fmt: float = 1.0, finished: bool = True,
         language: float | None = None) -> Candidate:
    return Candidate(prompt, f"q{prompt}", "5", response, accuracy, fmt, finished, language, len(response.split()))


def test_keeps_exactly_the_correct_well_formatted_finished_samples():
    samples = [
        cand(0, GOOD),                                                        # kept
        cand(0, "<think> guess </think> <answer> 6 </answer>", accuracy=0.0),  # wrong answer
        cand(0, "the answer is 5", fmt=0.0),                                  # right, but no R1 format
        cand(0, "<think> 2 plus 3 and then and then", finished=False, fmt=0.0, accuracy=0.0),
        cand(1, "<think> count three more from two gives five </think> <answer>5</answer>"),  # kept
        cand(1, "<think> long </think> <answer> 5 </answer>", finished=False),  # cut at the limit
    ]
    kept, counts = select(samples, Filters(keep="correct", max_per_prompt=10))
    assert kept == [samples[0], samples[4]]
    assert counts == {"candidates": 6, "kept": 2, "prompts_with_a_kept_answer": 2, "incorrect": 2, "bad_format": 1,
                      "truncated": 1}


def test_keep_all_keeps_wrong_answers_but_still_deduplicates_and_caps():
    samples = [cand(0, "a b c d", accuracy=0.0), cand(0, "a  b c d", accuracy=0.0), cand(0, "x y z w"),
               cand(0, "p q r s")]
    kept, counts = select(samples, Filters(keep="all", max_per_prompt=2))
    assert kept == [samples[0], samples[2]]
    assert counts["duplicate"] == 1 and counts["over_cap"] == 1


def test_exact_and_near_duplicates_per_prompt():
    base = "<think> " + " ".join(f"w{i}" for i in range(20)) + " </think> <answer> 5 </answer>"
    near = base.replace("w19", "v19")           # 3 of 23 word 3-grams change: Jaccard 20/26
    far = "<think> " + " ".join(f"z{i}" for i in range(20)) + " </think> <answer> 5 </answer>"
    assert jaccard(shingles(base), shingles(near)) == pytest.approx(20 / 26)
    samples = [cand(0, base), cand(0, "  " + base.upper() + " "), cand(0, near), cand(0, far),
               cand(1, base)]                    # the same text for another prompt is not a duplicate
    kept, counts = select(samples, Filters(near_duplicate=0.75))
    assert kept == [samples[0], samples[3], samples[4]]
    assert counts["near_duplicate"] == 2          # the upper-cased copy differs in case only: a near duplicate
    kept, counts = select(samples, Filters(near_duplicate=0.8))
    assert kept == [samples[0], samples[2], samples[3], samples[4]] and counts["near_duplicate"] == 1
    kept, counts = select(samples, Filters(near_duplicate=1.0))  # exact only (case aside)
    assert counts["near_duplicate"] == 1 and "duplicate" not in counts


def test_language_filter_when_asked():
    samples = [cand(0, GOOD, language=1.0), cand(0, GOOD.replace("two", "二"), language=0.9)]
    kept, counts = select(samples, Filters(language="en", min_language=0.95))
    assert kept == [samples[0]] and counts["language"] == 1
    kept, counts = select(samples, Filters())      # no language asked: both kept (3 of 17 word 3-grams differ)
    assert kept == samples and "language" not in counts


def test_bad_filters_are_refused_by_name():
    for f, message in ((Filters(keep="some"), "--keep"), (Filters(language="xx"), "--language"),
                       (Filters(near_duplicate=0), "--near-duplicate"), (Filters(max_per_prompt=0), "--max-per-prompt")):
        with pytest.raises(ValueError, match=message):
            select([cand(0, GOOD)], f)


def test_the_file_holds_the_kept_rows_and_its_provenance(tmp_path):
    kept = [cand(0, GOOD), cand(3, GOOD.replace("two", "2"))]
    prov = {"model": "m", "checkpoint_step": 7, "counts": {"kept": 2}}
    out = write(kept, tmp_path / "sft.parquet", prov)
    table = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in table] == ["q0", "q3"] and table[1]["response"] == kept[1].response
    assert read_provenance(out) == prov
    with pytest.raises(ValueError, match="no rlsys provenance"):
        pq.write_table(pq.read_table(out).replace_schema_metadata({}), tmp_path / "plain.parquet")
        read_provenance(tmp_path / "plain.parquet")


def test_doctests():
    import doctest

    from rlsys.data import traces

    assert doctest.testmod(traces).failed == 0
