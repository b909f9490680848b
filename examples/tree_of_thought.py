"""Tree of thought with nested forks: each thought branches into more thoughts; a judge (`select`)
rates every leaf in a side branch; the best path is extended into an answer. All branches share their parents'
prefix in the radix cache, and sibling branches are generated in one batch.

    python examples/tree_of_thought.py [URL]
"""

import sys

import radixflow as rf


def expand(s, depth, width, leaves):
    """Grow `width` thoughts under `s`, recursively; collect the leaf states."""
    if depth == 0:
        leaves.append(s)
        return
    branches = s.fork(width)
    branches += lambda i: "\nThought:" + rf.gen("thought", max_tokens=14, stop="\n", temperature=0.8, seed=i)
    for branch in branches:
        expand(branch, depth - 1, width, leaves)


@rf.function
def tree_of_thought(s, question, width=2, depth=2):
    s += f"Question: {question}\nLet's reason step by step."
    leaves = []
    expand(s, depth, width, leaves)
    judges = [leaf.fork(1)[0] for leaf in leaves]  # judge in side branches: leaves stay clean
    for judge in judges:
        judge += "\nIs this reasoning correct? Answer yes or no: " + rf.select("verdict", ["yes", "no"])
    logprobs = [judge.get_meta_info("verdict")["normalized_prompt_logprobs"] for judge in judges]
    scores = [yes - no for yes, no in logprobs]
    best = leaves[max(range(len(leaves)), key=scores.__getitem__)]
    best += "\nSo the answer is" + rf.gen("answer", max_tokens=12, stop="\n", temperature=0)
    return best, scores


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    question = "A farmer has 3 pens with 4 sheep each. How many sheep are there?"
    state = tree_of_thought.run(question=question, width=3, depth=2)
    best, scores = state.ret_value
    print(f"{len(scores)} leaves, judge scores (log p(yes) - log p(no)): {[round(x, 2) for x in scores]}")
    print("best path:", best.text()[len(f"Question: {question}\n"):])
