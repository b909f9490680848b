"""The smallest radixflow program: a chat turn, run once, then streamed.

    python examples/hello.py            # in-process engine on the default model
    python examples/hello.py URL        # against `radixflow serve` at URL
"""

import sys

import radixflow as rf


@rf.function
def hello(s, name):
    s += rf.system("You are a friendly assistant. Answer in one short sentence.")
    s += rf.user(f"Say hello to {name}.")
    s += rf.assistant(rf.gen("greeting", max_tokens=24))


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    state = hello.run(name="Ada", temperature=0)
    print("greeting:", state["greeting"])
    print("messages:", state.messages())

    print("streamed: ", end="")
    for piece in hello.run(name="Grace", temperature=0, stream=True).text_iter("greeting"):
        print(piece, end="", flush=True)
    print()
