"""A multi-turn chat: every turn's prompt extends the last, so the radix cache serves the history.

    python examples/multi_turn_chat.py [URL]
"""

import sys

import radixflow as rf


@rf.function
def multi_turn(s, questions):
    s += rf.system("You are a helpful assistant. Answer in one sentence.")
    for i, question in enumerate(questions):
        s += rf.user(question)
        s += rf.assistant(rf.gen(f"answer_{i}", max_tokens=24))


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    questions = ["What is the capital of France?", "What river flows through it?", "Name one famous museum there."]
    state = multi_turn.run(questions=questions, temperature=0)
    for i, question in enumerate(questions):
        meta = state.get_meta_info(f"answer_{i}")
        print(f"user:      {question}")
        print(f"assistant: {state[f'answer_{i}']}")
        print(f"           (prompt {meta['prompt_tokens']} tokens, {meta['cached_tokens']} from the cache)")
