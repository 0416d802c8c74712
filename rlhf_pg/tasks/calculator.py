"""A task that needs a tool: 3-digit x 1-digit products ``"123*4="``, with a ``calculator`` the model may call.

builtin:arith-gpt (0.8M parameters, pre-trained on sums of two 2-digit numbers) cannot multiply unaided.
With ``recipes/calculator_tool.yaml``'s formats an episode that uses the tool reads

    123*4=  [calculator 123*4]  =492;  492<eos>
    prompt  action (a call)     obs    action (the answer)

and the answer is scored by the ``calculator_exact`` reward (``reward_models/tasks.py``) on the model's last turn. The demonstrations for the SFT
warm-up (``write_dataset``) use the tool only half of the time (``tool_fraction``): the rest answer directly,
which this model gets wrong, so the reward is what teaches it to reach for the tool.

    python -m rlhf_pg.tasks.calculator recipes/data/calculator.jsonl    # regenerate the shipped data
    python -m rlhf_pg.tasks.calculator --chat    # recipes/data/calculator_chat.jsonl, for a chat model
"""

from __future__ import annotations

import ast
import json
import operator
import random
import sys
from pathlib import Path

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod, ast.Pow: operator.pow, ast.Div: operator.truediv}
MAX_DIGITS = 60  # results (and operands) beyond this many digits are refused: no tool call may hang the run


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers with + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "123*4".

    Returns:
        The value as text: an integer without a decimal point, e.g. "492".
    """
    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r:.40}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) * len(str(abs(int(left)))) > MAX_DIGITS:
            raise ValueError("the result would be too large")
        value = _OPERATORS[type(node.op)](left, right)
        if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
            raise ValueError("the result would be too large")
        return value
    raise ValueError(f"unsupported syntax: {ast.dump(node)[:40]}")


def demonstration(a: int, b: int, use_tool: bool, tool_format: str = "[{name} {args}]",
                  result_format: str = "={result};") -> str:
    """The completion a demonstrator writes for ``a*b``: a call, its result, the answer; or the answer alone."""
    if not use_tool:
        return str(a * b)
    call = tool_format.replace("{name}", "calculator").replace("{args}", f"{a}*{b}")
    return call + result_format.replace("{result}", str(a * b)) + str(a * b)


CHAT_SYSTEM = ("You have a calculator. To use it, write <tool>calculator(EXPRESSION)</tool>; its result follows "
               "as <result>VALUE</result>.")
CHAT_QUESTION = "What is {a}*{b}? Reply with only the number."


def write_dataset(path: str | Path, tool_fraction: float = 0.5, seed: int = 0, low: int = 100, high: int = 999,
                  factors: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9), chat: bool = False, rows: int | None = None) -> int:
    """Write every ``a*b`` (a in [low, high], b in ``factors``) as jsonl rows ``prompt, completion, answer``,
    shuffled (the first ``rows`` only, when given); ``completion`` uses the tool with probability
    ``tool_fraction``. ``chat``: conversational prompts (a system message that describes the tool in the default
    formats, then the question) for a chat model. Returns the number of rows."""
    rng = random.Random(seed)
    problems = [(a, b) for a in range(low, high + 1) for b in factors]
    rng.shuffle(problems)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for a, b in problems[:rows]:
            use_tool = rng.random() < tool_fraction
            if chat:
                prompt = [{"role": "system", "content": CHAT_SYSTEM},
                          {"role": "user", "content": CHAT_QUESTION.format(a=a, b=b)}]
                completion = demonstration(a, b, use_tool, "<tool>{name}({args})</tool>", "<result>{result}</result>")
            else:
                prompt, completion = f"{a}*{b}=", demonstration(a, b, use_tool)
            handle.write(json.dumps({"prompt": prompt, "completion": completion, "answer": str(a * b)}) + "\n")
    return len(problems[:rows])


if __name__ == "__main__":  # pragma: no cover - the data generator
    chat = "--chat" in sys.argv
    paths = [a for a in sys.argv[1:] if a != "--chat"]
    target = paths[0] if paths else ("recipes/data/calculator_chat.jsonl" if chat else "recipes/data/calculator.jsonl")
    count = write_dataset(target, chat=chat, rows=1000 if chat else None)
    print(f"{count} rows written to {target}")
