"""Rollouts that call tools (rlsys.actors.tools): turns assembled exactly, tool outputs masked out of
the loss with no log-prob, the turn and token budgets kept, the calculator's answers and refusals."""

import pytest
import torch

from rlsys.actors.tools import Turn, calculate, chat_tool_turn, multi_turn, run_calculator, tool_call
from rlsys.config import AlgoConfig
from rlsys.math.batch import make_batch
from rlsys.types import Rollout


def tokenize(text: str) -> list[int]:
    """A character tokenizer offset to 1000, so a tool's tokens cannot be mistaken for the script's."""
    return [1000 + ord(c) for c in text]


class Script:
    """An engine that answers each context with the next of its scripted turns, and records what it
    was asked (the context it continued from and the token budget)."""

    def __init__(self, turns: dict[int, list[Turn]]):
        self.turns = {k: list(v) for k, v in turns.items()}  # prompt's first token -> its turns in order
        self.asked: list[tuple[list[int], int]] = []

    def __call__(self, contexts, budgets):
        self.asked += list(zip(contexts, budgets))
        return [self.turns[ctx[0]].pop(0) for ctx in contexts]


def turn(ids, text, stop=None, finish="stop"):
    return Turn(list(ids), [-0.5] * len(ids), text, finish, stop)


def calc(tool, call):
    assert tool == "calculator"
    return run_calculator(call)


def test_a_tool_call_is_answered_masked_and_continued_from_the_whole_context():
    engine = Script({
        1: [turn([11, 12, 13], "<calc> 6 * 7 </calc>", stop="</calc>"),
            turn([14, 15], " <answer> 42 </answer>")],
        2: [turn([21, 22], "<answer> 5 </answer>")],  # answers at once: one turn, no tool
    })
    a, b = multi_turn([[1, 100], [2, 200]], engine, tokenize, ["calculator"], max_turns=4, max_tokens=64,
                      run_tool=calc)
    output = " <output> 42 </output>"
    assert a.response_ids == [11, 12, 13] + tokenize(output) + [14, 15]
    assert a.loss_mask == [1, 1, 1] + [0] * len(output) + [1, 1]
    assert a.logprobs == [-0.5] * 3 + [0.0] * len(output) + [-0.5] * 2
    assert a.text == "<calc> 6 * 7 </calc>" + output + " <answer> 42 </answer>"
    assert a.own_text == "<calc> 6 * 7 </calc> <answer> 42 </answer>"  # what the rewards judge
    assert (a.turns, a.tool_calls, a.tool_errors, a.finish_reason) == (2, 1, 0, "stop")
    assert (b.response_ids, b.loss_mask, b.turns, b.tool_calls) == ([21, 22], [1, 1], 1, 0)
    # turn 2 continued from the prompt, the sampled call and the output, with what was left of the budget
    assert engine.asked == [([1, 100], 64), ([2, 200], 64),
                            ([1, 100, 11, 12, 13] + tokenize(output), 64 - 3 - len(output))]


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from rlsys.config import load_config
    from rlsys.data.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(load_config(None, ["model.path=smollm2-135m-instruct"]).model))


def test_a_tool_turn_is_the_chat_templates_own_text_masked_out():
    """generator.tool_output=turn: after the call, the assistant's turn is closed, the output comes as a
    message of role tool and a new assistant turn opens, all as SmolLM2's chat template writes them
    and all masked out; the next turn continues from there. A template without a tool role is refused
    by name."""
    tokenizer = smollm2_tokenizer()
    between = chat_tool_turn(tokenizer, "42")
    assert between == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    engine = Script({1: [turn([11, 12], "<calc> 6 * 7 </calc>", stop="</calc>"),
                         turn([14, 15], "<answer> 42 </answer>")]})
    [a] = multi_turn([[1, 100]], engine, encode, ["calculator"], max_turns=4, max_tokens=64, run_tool=calc,
                     wrap=lambda out: chat_tool_turn(tokenizer, out))
    assert a.response_ids == [11, 12] + encode(between) + [14, 15]
    assert encode(between)[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the special token, not its letters
    assert a.loss_mask == [1, 1] + [0] * len(encode(between)) + [1, 1]
    assert a.text == "<calc> 6 * 7 </calc>" + between + "<answer> 42 </answer>"
    assert a.own_text == "<calc> 6 * 7 </calc><answer> 42 </answer>"
    assert engine.asked[1] == ([1, 100, 11, 12] + encode(between), 64 - 2 - len(encode(between)))

    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool "
                               "role here') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"cannot render a tool message \(TemplateError: no tool role here\); "
                                         r"use generator.tool_output=block"):
        chat_tool_turn(tokenizer, "42")


def test_a_failed_call_says_why_in_its_output_and_is_counted():
    engine = Script({1: [turn([11], "<calc> 1 / 0 </calc>", stop="</calc>"), turn([12], " done")]})
    [r] = multi_turn([[1]], engine, tokenize, ["calculator"], max_turns=3, max_tokens=100, run_tool=calc)
    assert r.text == "<calc> 1 / 0 </calc> <output> error: division by zero </output> done"
    assert (r.tool_calls, r.tool_errors, r.turns) == (1, 1, 2)


def test_the_turn_limit_ends_a_rollout_at_its_last_call_unanswered():
    call = turn([11], "<calc> 1 + 1 </calc>", stop="</calc>")
    engine = Script({1: [call, call]})
    [r] = multi_turn([[1]], engine, tokenize, ["calculator"], max_turns=2, max_tokens=100, run_tool=calc)
    assert (r.turns, r.tool_calls) == (2, 1)  # the second call is the last turn: no output, no third turn
    assert r.loss_mask[-1] == 1 and r.text.endswith("</calc>") and r.finish_reason == "stop"


def test_the_token_budget_cuts_an_output_that_does_not_fit_and_ends_the_rollout():
    engine = Script({1: [turn(range(11, 21), "<calc> 9 ** 9 </calc>", stop="</calc>")]})
    [r] = multi_turn([[1]], engine, tokenize, ["calculator"], max_turns=4, max_tokens=16, run_tool=calc)
    assert len(r.response_ids) == 16 and r.loss_mask == [1] * 10 + [0] * 6
    assert r.response_ids[10:] == tokenize(" <output> 387420489 </output>")[:6]
    assert r.finish_reason == "length" and r.turns == 1
    # a call that used the last token itself: no room for an output, no tool run
    engine = Script({1: [turn(range(11, 17), "<calc> 2 </calc>", stop="</calc>")]})
    [r] = multi_turn([[1]], engine, tokenize, ["calculator"], max_turns=4, max_tokens=6, run_tool=calc)
    assert (r.tool_calls, r.finish_reason, r.loss_mask) == (0, "length", [1] * 6)


def test_a_call_is_the_last_element_of_its_tag():
    assert tool_call("<calc> 1 </calc> then <calc> 2 * 3 </calc>", "calc") == "2 * 3"
    assert tool_call(" 6 * 7 </calc>", "calc") == "6 * 7"  # the prompt opened the call
    assert tool_call("no call at all", "calc") == ""


def test_calculator_answers_arithmetic_and_refuses_everything_else():
    assert calculate("347 * 862") == "299114"
    assert calculate("2 ^ 10") == "1024" and calculate("3 × 4") == "12"
    assert calculate("10 / 4") == "2.5" and calculate("1 / 3") == "0.3333333333"
    for expression, why in [("__import__('os').system('id')", "not arithmetic"), ("x + 1", "not arithmetic: Name"),
                            ("9 ** 9 ** 9", "exponent"), ("10 ** 99 * 10 ** 99", "out of range"),
                            ("1 +", "not an expression"), ("(-1) ** 0.5", "out of range")]:
        with pytest.raises(ValueError, match=why):
            calculate(expression)


def test_tool_output_tokens_are_in_the_row_but_out_of_the_loss():
    def rollout(mask, reward_group=0):
        return Rollout(prompt_index=0, group=reward_group, prompt_ids=[5, 6], response_ids=[7, 8, 9, 10],
                       response_logprobs=[-1.0, 0.0, 0.0, -2.0], text="", finish_reason="stop", weight_version=0,
                       answer="", loss_mask=mask)

    batch = make_batch([rollout([1, 0, 0, 1]), rollout(None)], [1.0, 0.0], AlgoConfig(group_size=2))
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]] * 2  # the model reads the output tokens
    assert batch.attention_mask.tolist() == [[1] * 6] * 2
    assert torch.equal(batch.loss_mask, torch.tensor([[0, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.float32))


@pytest.mark.parametrize("form", ["block", "turn"])
def test_a_real_engine_calls_the_calculator_and_continues_after_its_output(ray_cluster, form):
    """SmolLM2-135M-Instruct in a real vLLM engine, greedy, on a prompt whose worked example calls the
    calculator and which opens the next call: the model writes the expression and closes the call
    (it does not open one unprompted at this size), the engine stops at </calc>, the output is put in
    and masked out (log-prob 0), and the engine continues from the whole context. block: the output
    inside the text; turn: as a chat message of role tool, the example written in the chat template
    too. The model's own tokens around the output are what the engine sampled; the output's tokens
    are exactly the tokenizer's."""
    import ray

    from rlsys.cluster.groups import launch
    from rlsys.config import load_config
    from rlsys.data.models import resolve_model

    cfg = load_config(None, ["model.path=smollm2-135m-instruct", "generator.num_engines=1", "generator.tools=[calculator]",
                             "generator.max_turns=3", "generator.max_tokens=48", "generator.max_model_len=512",
                             "reward.num_workers=1", f"generator.tool_output={form}",
                             f"data.template={'chat' if form == 'turn' else 'r1_zero'}"])
    model_path = resolve_model(cfg.model)
    tokenizer = smollm2_tokenizer()
    if form == "block":
        prompt = ("Q: What is 12 * 3?\nA: <calc> 12 * 3 </calc> <output> 36 </output> The answer is 36.\n\n"
                  "Q: What is 347 * 862?\nA: <calc>")
        expected = " <output> 299114 </output>"
    else:
        prompt = tokenizer.apply_chat_template([
            {"role": "user", "content": "What is 12 * 3?"}, {"role": "assistant", "content": "<calc> 12 * 3 </calc>"},
            {"role": "tool", "content": "36"}, {"role": "assistant", "content": "The answer is 36."},
            {"role": "user", "content": "What is 347 * 862?"}], tokenize=False, add_generation_prompt=True) + "<calc>"
        expected = chat_tool_turn(tokenizer, "299114")
    ids = tokenizer.encode(prompt)
    groups = launch(cfg, model_path, verifier="number", train=False)
    try:
        [r] = ray.get(groups.generators.engines[0].actor.generate.remote([(0, 0, ids, "299114")], n=1, greedy=True))
    finally:
        groups.shutdown()
    assert r.tool_calls >= 1 and r.turns == r.tool_calls + 1, r.text
    assert r.text.startswith(" 347 * 862 </calc>"), r.text
    first = r.text.index("</calc>") + len("</calc>")
    assert r.text[first:first + len(expected)] == expected, r.text  # the model copied the numbers into its call
    out_ids = tokenizer.encode(expected, add_special_tokens=False)
    start = r.loss_mask.index(0)
    assert r.loss_mask[start:start + len(out_ids)] == [0] * len(out_ids) and r.response_ids[start:start + len(out_ids)] \
        == out_ids
    assert all(lp == 0.0 for lp, m in zip(r.response_logprobs, r.loss_mask) if m == 0)
    assert sum(r.loss_mask[start + len(out_ids):]) > 0, "the engine went on after the output"
    assert len(r.response_ids) <= 48 and len(r.loss_mask) == len(r.response_ids) == len(r.response_logprobs)
    assert r.model_text().startswith(r.text[:first]) and expected not in r.model_text(), r.model_text()  # judged


def test_the_rewards_judge_the_models_own_text_never_a_tools_output(ray_cluster):
    """A rollout that called the calculator and stopped has the right number only in the tool's
    output: accuracy 0 with the lenient reader (the last number in the text would be the tool's).
    One that copied the output into its answer: 1. The reward workers see the text without the
    output, and evaluation's answer key is the model's."""
    from rlsys.cluster.remote import RewardActor
    from rlsys.cluster.rewards import RewardPool
    from rlsys.config import RewardConfig
    from rlsys.math.rewards import answer_key

    engine = Script({
        1: [turn([11], "<think> <calc> 6 * 7 </calc>", stop="</calc>"), turn([12], " </think>")],
        2: [turn([21], "<think> <calc> 6 * 7 </calc>", stop="</calc>"), turn([22], " </think> 42")],
    })
    stopped, copied = multi_turn([[1], [2]], engine, tokenize, ["calculator"], max_turns=4, max_tokens=64,
                                 run_tool=calc)
    rollouts = [Rollout(prompt_index=i, group=i, prompt_ids=[i + 1], response_ids=r.response_ids,
                        response_logprobs=r.logprobs, text=r.text, own_text=r.own_text, finish_reason="stop",
                        weight_version=0, answer="42", loss_mask=r.loss_mask)
                for i, r in enumerate([stopped, copied])]
    assert "42" in rollouts[0].text and rollouts[0].model_text() == "<think> <calc> 6 * 7 </calc> </think>"
    cfg = RewardConfig(verifier="number", require_answer_tag=False)
    pool = RewardPool([RewardActor.options(num_cpus=0).remote(cfg)])
    try:
        assert [s.accuracy for s in pool.score(rollouts)] == [0.0, 1.0]
    finally:
        pool.close()
    assert [answer_key(r.model_text(), cfg) for r in rollouts] == ["7", "42"]  # the last number the model wrote


def test_tool_metrics_count_turns_calls_errors_and_output_tokens():
    from rlsys.observe.metrics import tool_stats

    def rollout(mask, turns, calls, errors):
        return Rollout(prompt_index=0, group=0, prompt_ids=[1], response_ids=[2] * len(mask),
                       response_logprobs=[0.0] * len(mask), text="", finish_reason="stop", weight_version=0, answer="",
                       loss_mask=mask, turns=turns, tool_calls=calls, tool_errors=errors)

    stats = tool_stats([rollout([1, 0, 0, 1], 2, 1, 0), rollout([1, 1], 1, 0, 0), rollout([1, 0, 1, 0, 1, 1], 3, 2, 1),
                        rollout([1, 1, 1, 1], 1, 0, 0)])
    # 16 response tokens, 4 of them tools' output; 7 turns, 3 calls (1 failed) over 4 rollouts, 2 of which called
    assert stats == {"tools/turns_mean": 7 / 4, "tools/calls_mean": 3 / 4, "tools/errors_mean": 1 / 4,
                     "tools/used_frac": 2 / 4, "tools/output_token_frac": 4 / 16, "tools/seconds": 0.0}


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="the sandbox's per-run uids need root")
def test_the_python_tool_runs_in_the_sandbox_and_reports_its_failure():
    from rlsys.actors.generator import Generator
    from rlsys.sandbox.execute import Limits, Sandbox

    generator = Generator.__new__(Generator)  # the tool alone: no engine needed
    generator.tool_sandbox, generator.tool_limits = Sandbox(), Limits(wall_s=5.0)
    try:
        assert generator._run_tool("python", "print(2 ** 100)") == (str(2 ** 100), False)
        assert generator._run_tool("python", "import os; print(sorted(os.environ))") == \
            ("['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONDONTWRITEBYTECODE']", False)  # nothing of the worker's environment
        output, failed = generator._run_tool("python", "1 / 0")
        assert failed and output.startswith("error: exit code 1: ZeroDivisionError")
        output, failed = generator._run_tool("python", "while True: pass")
        assert failed and output in ("error: killed by SIGKILL", "error: past the wall-clock deadline",
                                     "error: killed by SIGXCPU")
        assert generator._run_tool("calculator", "2 * 21") == ("42", False)
    finally:
        generator.tool_sandbox.close()
