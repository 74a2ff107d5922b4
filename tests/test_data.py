"""Tests for rlsys.data.prompts: reading rows, templates, and the resumable prompt stream."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsys.config import DataConfig
from rlsys.data.files import SOURCE_ROOT
from rlsys.data.prompts import (R1_ZERO_TEMPLATE, DataError, PromptStream, apply_template, load_rows, load_shots,
                                resolve_data_path)
from rlsys.data.models import build_tiny_tokenizer

ROWS = [("What is 2+3?", "5"), ("Copy the digit 7", "7"), ("Name a prime.", "2"),
        ("What is 10-4?", "6"), ("Spell one", "one")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def data_error(**cfg):
    with pytest.raises(DataError) as info:
        load_rows(DataConfig(**cfg))
    return str(info.value)


# ---------------------------------------------------------------- reading rows

def test_jsonl_and_parquet_give_the_same_rows(tmp_path):
    jl = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "answer": a} for q, a in ROWS])
    pqf = write_parquet(tmp_path / "d.parquet", {"prompt": [q for q, _ in ROWS], "answer": [a for _, a in ROWS]})
    assert load_rows(DataConfig(path=str(jl))) == ROWS
    assert load_rows(DataConfig(path=str(pqf))) == ROWS


def test_custom_fields_and_extra_columns(tmp_path):
    records = [{"id": i, "question": q, "solution": a, "prompt": "ignored"} for i, (q, a) in enumerate(ROWS)]
    jl = write_jsonl(tmp_path / "d.jsonl", records)
    pqf = write_parquet(tmp_path / "d.parquet", {k: [r[k] for r in records] for k in records[0]})
    for path in (jl, pqf):
        assert load_rows(DataConfig(path=str(path), prompt_field="question", answer_field="solution")) == ROWS


def test_numeric_answers_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": 2}, {"prompt": "2+2", "answer": 4}])
    assert load_rows(DataConfig(path=str(path))) == [("1+1", "2"), ("2+2", "4")]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_missing_column_names_file_and_column(tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        write_jsonl(path, [{"prompt": "q", "solution": "1"}])
    else:
        write_parquet(path, {"prompt": ["q"], "solution": ["1"]})
    msg = data_error(path=str(path))
    assert str(path) in msg and "'answer'" in msg and "data.answer_field" in msg

    msg = data_error(path=str(path), prompt_field="question", answer_field="solution")
    assert str(path) in msg and "'question'" in msg and "data.prompt_field" in msg


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_empty_answer_names_file_row_and_field(tmp_path, bad):
    records = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": bad}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    msg = data_error(path=str(path))
    assert str(path) in msg and "row 2" in msg and "'answer'" in msg


def test_missing_answer_key_in_one_jsonl_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    msg = data_error(path=str(path))
    assert str(path) in msg and "row 1" in msg and "'answer'" in msg


def test_empty_prompt_in_parquet_names_row_and_custom_field(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"q": ["x", "y", None, "z"], "a": ["1", "2", "3", "4"]})
    msg = data_error(path=str(path), prompt_field="q", answer_field="a")
    assert str(path) in msg and "row 2" in msg and "'q'" in msg


def test_malformed_json_line_names_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n{"prompt": "c", "answer": "3"}\n')
    msg = data_error(path=str(path))
    assert str(path) in msg and "JSON" in msg


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\na,1\n")
    msg = data_error(path=str(path))
    assert str(path) in msg and "'.csv'" in msg


def test_missing_file_names_the_path(tmp_path):
    msg = data_error(path="no/such/file.jsonl")
    assert "data.path=no/such/file.jsonl" in msg


def test_relative_path_falls_back_to_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("configs/data/toy_digits.jsonl") == SOURCE_ROOT / "configs" / "data" / "toy_digits.jsonl"
    rows = load_rows(DataConfig(path="configs/data/toy_digits.jsonl"))
    assert len(rows) == 200
    assert rows[0] == ("Copy the digit 6", "6")
    assert all(q == f"Copy the digit {a}" and a in "0123456789" for q, a in rows)


def test_relative_path_prefers_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "configs" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "configs" / "data" / "toy_digits.jsonl", [{"prompt": "local", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    assert load_rows(DataConfig(path="configs/data/toy_digits.jsonl")) == [("local", "1")]


# ---------------------------------------------------------------- templates

R1_EXPECTED = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: Copy the digit 6. Assistant:"
)


def test_r1_zero_template_word_for_word():
    assert apply_template("Copy the digit 6", DataConfig(template="r1_zero")) == R1_EXPECTED
    assert R1_ZERO_TEMPLATE.format(prompt="Copy the digit 6") == R1_EXPECTED


def test_r1_zero_template_does_not_double_the_final_period():
    text = apply_template("  Copy the digit 6.  ", DataConfig(template="r1_zero"))
    assert text == R1_EXPECTED
    assert ".." not in text
    assert text.endswith("User: Copy the digit 6. Assistant:")


def test_chat_template_uses_the_tokenizer():
    tok = build_tiny_tokenizer()
    text = apply_template("What is 2+3?", DataConfig(template="chat"), tok)
    assert text == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_without_tokenizer_fails():
    with pytest.raises(AssertionError, match="tokenizer"):
        apply_template("q", DataConfig(template="chat"))


def test_none_template_is_the_raw_prompt():
    assert apply_template(" Copy the digit 6. ", DataConfig(template="none")) == " Copy the digit 6. "


def test_system_prompt_and_prefill():
    tok = build_tiny_tokenizer()
    cfg = DataConfig(template="chat", system_prompt="Think first.", prefill="<think>")
    assert apply_template("What is 2+3?", cfg, tok) == (
        "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>")


SHOTS = [("What is 1+1?", "<think> one and one </think> <answer> 2 </answer>"), ("Say 3", "<think>3</think> <answer>3</answer>")]


def test_few_shot_examples_are_earlier_chat_turns_before_the_prefill():
    tok = build_tiny_tokenizer()
    cfg = DataConfig(template="chat", system_prompt="S.", prefill="<think>")
    assert apply_template("What is 2+3?", cfg, tok, SHOTS) == (
        "<|im_start|>system\nS.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<think> one and one </think> <answer> 2 </answer><|im_end|>\n"
        "<|im_start|>user\nSay 3<|im_end|>\n<|im_start|>assistant\n<think>3</think> <answer>3</answer><|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>")


def test_few_shot_examples_with_a_text_template_are_answered_and_a_blank_line_apart():
    cfg = DataConfig(template="r1_zero", prefill="<think>")
    text = apply_template("Copy the digit 6", cfg, None, SHOTS[:1])
    first = R1_ZERO_TEMPLATE.format(prompt="What is 1+1?")
    assert text == first + " <think> one and one </think> <answer> 2 </answer>\n\n" + R1_EXPECTED + "<think>"
    assert apply_template("q", DataConfig(template="none"), None, SHOTS[1:]) == "Say 3 <think>3</think> <answer>3</answer>\n\nq"


def test_load_shots_reads_the_shipped_examples_and_names_bad_rows(tmp_path):
    shots = load_shots("configs/data/r1_few_shot.jsonl")
    assert len(shots) == 3 and all(r.startswith("<think>") and r.endswith("</answer>") for _, r in shots)
    with pytest.raises(DataError, match="not found"):
        load_shots(tmp_path / "nowhere.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "r"}, {"prompt": "q", "response": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*prompt and response"):
        load_shots(bad)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "q", "response": "r"}\n{"prompt":\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not JSON"):
        load_shots(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no few-shot examples"):
        load_shots(tmp_path / "empty.jsonl")


def test_unknown_template_names_it():
    with pytest.raises(DataError, match="data.template 'alpaca'"):
        apply_template("q", DataConfig(template="alpaca"))


# ---------------------------------------------------------------- the prompt stream

@pytest.fixture
def five_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "answer": a} for q, a in ROWS])
    return DataConfig(path=str(path), template="none", prompts_per_step=2)


def indices(prompts):
    return [p.index for p in prompts]


def test_stream_prompts_carry_row_text_and_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "answer": a} for q, a in ROWS])
    stream = PromptStream(DataConfig(path=str(path), template="r1_zero", prompts_per_step=5), seed=0)
    for p in stream.next():
        q, a = ROWS[p.index]
        assert (p.question, p.answer) == (q, a)
        assert p.text == apply_template(q, DataConfig(template="r1_zero"))


def test_stream_default_batch_is_prompts_per_step(five_rows):
    assert len(PromptStream(five_rows, seed=0).next()) == 2
    assert len(PromptStream(five_rows, seed=0).next(3)) == 3


def test_stream_is_deterministic_for_a_seed(five_rows):
    a = [indices(PromptStream(five_rows, seed=3).next(20))]
    b = [indices(PromptStream(five_rows, seed=3).next(20))]
    assert a == b
    # 20 draws over 5 rows for other seeds: at least one of several seeds orders them differently
    others = {tuple(indices(PromptStream(five_rows, seed=s).next(20))) for s in range(4, 10)}
    assert len(others | {tuple(a[0])}) > 1


def test_stream_covers_every_row_once_per_epoch(five_rows):
    stream = PromptStream(five_rows, seed=1)
    drawn = indices(stream.next(15))
    for epoch in range(3):
        assert sorted(drawn[5 * epoch:5 * epoch + 5]) == [0, 1, 2, 3, 4], drawn
    assert stream.state() == {"epoch": 2, "cursor": 5, "rows": 5}



def test_stream_shuffles_and_reshuffles_each_epoch(five_rows):
    firsts, reshuffled = set(), False
    for seed in range(6):
        drawn = indices(PromptStream(five_rows, seed=seed).next(10))
        firsts.add(tuple(drawn[:5]))
        reshuffled |= drawn[:5] != drawn[5:]
    assert firsts != {(0, 1, 2, 3, 4)} and len(firsts) > 1, "the first epoch is not shuffled by seed"
    assert reshuffled, "every epoch repeats the first epoch's order"


def test_stream_resumes_the_exact_sequence(five_rows):
    straight = PromptStream(five_rows, seed=7)
    expected = indices(straight.next(3)) + indices(straight.next(9))

    first = PromptStream(five_rows, seed=7)
    head = indices(first.next(3))
    state = first.state()
    assert state == {"epoch": 0, "cursor": 3, "rows": 5}
    resumed = PromptStream(five_rows, seed=7)
    resumed.load_state(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint file
    assert head + indices(resumed.next(9)) == expected


def test_stream_resumes_at_an_epoch_boundary(five_rows):
    straight = PromptStream(five_rows, seed=2)
    expected = indices(straight.next(5)) + indices(straight.next(5))
    first = PromptStream(five_rows, seed=2)
    first.next(5)
    resumed = PromptStream(five_rows, seed=2)
    resumed.load_state(first.state())
    assert indices(resumed.next(5)) == expected[5:]


def test_prompts_are_encoded_once_with_one_bos():
    """A Llama-style tokenizer adds BOS to any text, and its chat template writes BOS too: the chat
    prompt must not get a second one; a plain template gets exactly the tokenizer's one."""
    from rlsys.data.prompts import encode

    tok = build_tiny_tokenizer("llama")
    bos = tok.bos_token_id
    chat = apply_template("What is 2+3?", DataConfig(template="chat"), tok)
    assert chat.startswith("<s>")
    [ids] = encode([chat], tok, "chat")
    assert ids[0] == bos and ids.count(bos) == 1
    [plain] = encode([apply_template("What is 2+3?", DataConfig(template="r1_zero"))], tok, "r1_zero")
    assert plain[0] == bos and plain.count(bos) == 1
    [qwen] = encode(["What is 2+3?"], build_tiny_tokenizer(), "none")  # Qwen-style: nothing added
    assert len(qwen) == len("What is 2+3?")


def test_prompt_length_check_counts_the_engines_token_ids():
    from rlsys.data.prompts import check_prompt_lengths

    ids = [[1] * 5, [1] * 7, [1] * 6]
    check_prompt_lengths(ids, budget=7, what="training data x.jsonl")  # 7 tokens fit a budget of 7
    with pytest.raises(DataError, match=r"training data x.jsonl: row 1 is 7 tokens once templated, over .* = 6"):
        check_prompt_lengths(ids, budget=6, what="training data x.jsonl")


def test_bad_rows_stop_by_default_and_are_skipped_and_counted_with_on_bad_row_skip(tmp_path):
    good = [json.dumps({"prompt": q, "answer": a}) for q, a in ROWS]
    lines = [good[0], "{broken json", good[1], json.dumps({"prompt": "no answer"}), good[2],
             json.dumps({"prompt": " ", "answer": "1"}), "[1, 2]", good[3], good[4]]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert "cannot parse as JSON lines" in data_error(path=str(path))  # stop: nothing is silently dropped
    skipped = []
    assert load_rows(DataConfig(path=str(path), on_bad_row="skip"), skipped) == ROWS
    assert [s.split(": ", 1)[1] for s in skipped] == [
        "line 2: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "line 7: not a JSON object", "line 4: field 'answer' is missing or empty",
        "line 6: field 'prompt' is missing or empty"]
    # a wrong field name is a config error, never a skipped row
    assert "no column 'question'" in data_error(path=str(path), on_bad_row="skip", prompt_field="question")


def test_prompts_too_long_are_left_out_with_skip(tmp_path):
    from rlsys.data.prompts import check_prompt_lengths

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * n, "answer": "1"} for n in (5, 500, 6, 7)])
    stream = PromptStream(DataConfig(path=str(path), template="none", on_bad_row="skip"), seed=0,
                          tokenizer=build_tiny_tokenizer())
    with pytest.raises(DataError, match="row 1 is"):
        check_prompt_lengths(stream.ids, 100, "training data")
    over = check_prompt_lengths(stream.ids, 100, "training data", skip=True)
    assert list(over) == [1]
    stream.drop(set(over), list(over.values()))
    assert sorted(len(p.question) for p in stream.next(6)) == [5, 5, 6, 6, 7, 7]  # two epochs of 3 rows
    assert stream.skipped == list(over.values())
