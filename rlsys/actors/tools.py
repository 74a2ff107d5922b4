"""Rollouts that call tools: the model writes a call, the tool's output is put into its text, and
generation goes on, up to generator.max_turns turns and generator.max_tokens tokens in all.

A call is an element the model writes: `<calc> 347 * 862 </calc>` (calculator: arithmetic on
numbers) or `<python> print(2 ** 100) </python>` (Python: the program's stdout, run in the code
rewards' sandbox, rlsys.sandbox). Generation stops at the closing tag (a vLLM stop string kept in
the output); the tool runs; its output comes back (generator.tool_output) as `<output> ... </output>`
in the assistant's text (block: R1's text form, as DeepSeek-R1's tool-free template leaves room for)
or as a chat message of role tool followed by a new assistant turn (turn: `chat_tool_turn`, the
model's chat template rendering both); the engine continues from the prompt, everything sampled
and the outputs, with the prefix cache holding the earlier turns' KV. The output's tokens are in the
response but not the model's: their loss mask is 0 and they carry no log-prob (0.0, never read: the
learner's loss, KL and mismatch metrics see only masked-in tokens). Nor are they judged: the
rewards read the rollout's own text (Rollout.model_text), the turns without the outputs, so copying
a tool's output into the answer counts and leaving it in the output does not.

`multi_turn` is pure logic over an `engine_step` function, so the tests run it on scripted turns;
Generator.generate hands it one over its vLLM engine.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import time
from typing import Callable

TOOLS = ("calculator", "python")
TAGS = {"calculator": "calc", "python": "python"}
OUTPUT_FORMS = ("block", "turn")
OUTPUT_CHARS = 200
"""A tool's output is cut to this many characters (a program that prints megabytes costs no context)."""


def output_block(output: str) -> str:
    """generator.tool_output=block: the output inside the assistant's text."""
    return f" <output> {output} </output>"


def chat_tool_turn(tokenizer, output: str) -> str:
    """generator.tool_output=turn: the text from the end of the assistant's call to the start of its
    next turn, as the model's chat template renders it: the assistant turn's end, a message of role
    tool holding `output`, and the next assistant turn's opening. A template that has no tool role
    raises ValueError naming it."""
    from jinja2 import TemplateError  # what transformers' templates raise, their raise_exception included

    mark = "\x00CALL\x00"  # where the assistant's text ends: nothing a template writes
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(turns + [{"role": "tool", "content": output}], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as e:
        raise ValueError(f"generator.tool_output=turn: the model's chat template cannot render a tool message "
                         f"({type(e).__name__}: {e}); use generator.tool_output=block") from e
    after = text.partition(mark)[2]
    if text.count(mark) != 1 or output not in after:
        raise ValueError("generator.tool_output=turn: the model's chat template does not show the assistant's text "
                         "and then the tool's output; use generator.tool_output=block")
    return after


@dataclasses.dataclass
class Turn:
    """What the engine sampled in one turn of one rollout."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # stop | length
    stop: str | None  # the stop string that ended it (a tool's closing tag), None for EOS or length


@dataclasses.dataclass
class ToolRollout:
    """One multi-turn response: the tokens of every turn and of every tool output between them."""
    prompt_ids: list[int]
    response_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)  # 1: sampled by the model, 0: a tool's output
    text: str = ""
    own_text: str = ""  # text without the tools' outputs: what the model wrote
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0


EngineStep = Callable[[list[list[int]], list[int]], list[Turn]]
"""engine_step(token ids to continue from, max new tokens each) -> one Turn each."""
Tokenize = Callable[[str], list[int]]


def stop_strings(tools: list[str]) -> list[str]:
    return [f"</{TAGS[t]}>" for t in tools]


def multi_turn(prompts: list[list[int]], engine_step: EngineStep, tokenize: Tokenize, tools: list[str],
               max_turns: int, max_tokens: int, run_tool: Callable[[str, str], tuple[str, bool]],
               wrap: Callable[[str], str] = output_block) -> list[ToolRollout]:
    """One rollout per prompt (repeat a prompt for several samples). Each turn continues every
    unfinished rollout; a turn that ends at a tool's closing tag, with turns and tokens left, gets the
    tool's output (run_tool(tool, call) -> (output, failed)) appended as wrap(output), masked out, and
    goes on. A rollout whose tokens reach max_tokens ends with finish_reason "length", the output cut
    if need be."""
    rollouts = [ToolRollout(list(p)) for p in prompts]
    active = list(range(len(prompts)))
    by_stop = {f"</{TAGS[t]}>": t for t in tools}
    while active:
        turns = engine_step([rollouts[i].prompt_ids + rollouts[i].response_ids for i in active],
                            [max_tokens - len(rollouts[i].response_ids) for i in active])
        still = []
        for i, turn in zip(active, turns):
            r = rollouts[i]
            r.response_ids += turn.token_ids
            r.logprobs += turn.logprobs
            r.loss_mask += [1] * len(turn.token_ids)
            r.text += turn.text
            r.own_text += turn.text
            r.turns += 1
            r.finish_reason = turn.finish_reason
            left = max_tokens - len(r.response_ids)
            tool = by_stop.get(turn.stop) if turn.finish_reason == "stop" else None
            if tool is None or r.turns >= max_turns or left <= 0:
                if tool is not None and left <= 0:
                    r.finish_reason = "length"
                continue
            call = tool_call(r.text, TAGS[tool])
            start = time.perf_counter()
            output, failed = run_tool(tool, call)
            r.tool_seconds += time.perf_counter() - start
            r.tool_calls += 1
            r.tool_errors += failed
            block = wrap(output[:OUTPUT_CHARS])
            ids = tokenize(block)
            if len(ids) >= left:  # no room left to answer after the output: the rollout ends here
                ids = ids[:left]
                r.finish_reason = "length"
            r.response_ids += ids
            r.logprobs += [0.0] * len(ids)
            r.loss_mask += [0] * len(ids)
            r.text += block
            if r.finish_reason != "length":
                still.append(i)
        active = still
    return rollouts


def tool_call(text: str, tag: str) -> str:
    """The content of the call that ended the turn: from the last `<tag>` before the last `</tag>`,
    or from the start of the response when the prompt (or data.prefill) opened the call."""
    end = text.rfind(f"</{tag}>")
    if end < 0:
        return ""
    start = text.rfind(f"<{tag}>", 0, end)
    return text[start + len(tag) + 2 if start >= 0 else 0:end].strip()


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 100
MAX_DIGITS = 60


def calculate(expression: str) -> str:
    """The calculator: + - * / // % ** and parentheses on numbers, nothing else (no names, no calls);
    exponents above MAX_EXPONENT and results above MAX_DIGITS digits are refused, so no call is slow.
    Raises ValueError naming what it refused.

    >>> calculate("347 * 862"), calculate("(2 + 3) ** 2 / 4"), calculate("7 // 2"), calculate("-1.5 * 2")
    ('299114', '6.25', '3', '-3')
    >>> calculate("__import__('os')")
    Traceback (most recent call last):
    ...
    ValueError: not arithmetic: Call
    """
    expression = expression.replace("×", "*").replace("^", "**").strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} above {MAX_EXPONENT}")
            result = _BINARY[type(node.op)](left, right)
            if isinstance(result, complex) or (isinstance(result, int) and abs(result) >= 10 ** MAX_DIGITS):
                raise ValueError("result out of range")
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        result = value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(result, float):
        if not math.isfinite(result):
            raise ValueError("result out of range")
        if result.is_integer():
            return str(int(result))
        return f"{result:.10g}"
    return str(result)




def run_calculator(call: str) -> tuple[str, bool]:
    try:
        return calculate(call), False
    except ValueError as e:
        return f"error: {e}", True
