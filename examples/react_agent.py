"""A ReAct-style agent: the model thinks, picks an action with `select`, writes a calculator input
under a regex constraint, and reads the tool's observation back.

    python examples/react_agent.py [URL]
"""

import ast
import operator
import sys

import radixflow as rf

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
EXPRESSION = r"[0-9]{1,6} [-+*/] [0-9]{1,6}"  # one operation per step


def calculator(expression: str) -> str:
    """Evaluate + - * / over integers without eval()."""
    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression: {expression!r}")
    try:
        value = ev(ast.parse(expression, mode="eval").body)
        return str(int(value)) if value == int(value) else f"{value:.6g}"
    except (ValueError, ZeroDivisionError) as e:
        return f"error: {e}"


EXAMPLE = ("Question: What is 12 times 11?\nThought: I need to multiply.\nAction: calculator[12 * 11]\n"
           "Observation: 132\nThought: I know the answer.\nAction: finish[132]\n\n")


@rf.function
def react(s, question, max_steps=3):
    s += "Answer with the calculator tool, in this format.\n\n" + EXAMPLE
    s += f"Question: {question}\n"
    for _ in range(max_steps):
        s += "Thought:" + rf.gen("thought", max_tokens=16, stop="\n") + "\n"
        s += "Action: " + rf.select("action", ["calculator", "finish"])
        if s["action"] == "finish":
            break
        # The closing bracket is part of the regex: the model ends the input itself.
        s += "[" + rf.gen("input", regex=EXPRESSION + r"\]", max_tokens=16) + "\n"
        s += f"Observation: {calculator(s['input'][:-1])}\n"
    s += "[" + rf.gen("answer", regex=r"-?[0-9]+(\.[0-9]+)?\]", max_tokens=8) + "\n"
    return s["answer"][:-1]


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    state = react.run(question="What is 37 plus 58?", temperature=0)
    print(state.text()[len("Answer with the calculator tool, in this format.\n\n" + EXAMPLE):])
    print("final answer:", state.ret_value)
