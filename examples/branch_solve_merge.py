"""Branch-solve-merge (Saha et al., 2023) for evaluating an answer: branch into one evaluation per
criterion (forks of one shared prefix), solve each (a score via `select` plus a reason), and merge
the branches' results into one verdict.

    python examples/branch_solve_merge.py [URL]
"""

import sys

import radixflow as rf

CRITERIA = ["correctness", "clarity", "conciseness"]


@rf.function
def branch_solve_merge(s, question, answer):
    s += rf.system("You are a strict evaluator of answers.")
    s += rf.user(f"Question: {question}\nAnswer: {answer}")
    # branch: one evaluator per criterion, all sharing the prefix above
    branches = s.fork(len(CRITERIA))
    branches += lambda i: rf.user(f"Rate only the {CRITERIA[i]} of the answer from 1 to 5.") + rf.assistant(
        "Score: " + rf.select("score", ["1", "2", "3", "4", "5"]) + "/5. Reason:"
        + rf.gen("reason", max_tokens=20, stop="\n"))
    branches.join()  # solve: s["score"] and s["reason"] are now lists, one item per criterion
    # merge
    report = "\n".join(f"- {c}: {sc}/5, {r.strip()}" for c, sc, r in zip(CRITERIA, s["score"], s["reason"]))
    s += rf.user(f"Evaluations:\n{report}\nIs the answer acceptable overall?")
    s += rf.assistant(rf.select("verdict", ["Yes", "No"]) + "." + rf.gen("summary", max_tokens=20, stop="\n"))
    return report


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    state = branch_solve_merge.run(question="Why is the sky blue?",
                                   answer="Air molecules scatter blue sunlight more than red light.",
                                   temperature=0)
    print(state.ret_value)
    print("verdict:", state["verdict"] + "." + state["summary"])
