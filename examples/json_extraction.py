"""JSON extraction with a JSON-schema constraint: the output always parses and validates.

    python examples/json_extraction.py [URL]
"""

import json
import sys

import radixflow as rf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@rf.function
def extract(s, text):
    s += rf.system("Extract the person's name, age and city from the text as JSON.")
    s += rf.user(text)
    s += rf.assistant(rf.gen("person", json_schema=PERSON, max_tokens=48))


if __name__ == "__main__":
    rf.set_default_backend(rf.RuntimeEndpoint(sys.argv[1]) if len(sys.argv) > 1 else rf.Engine())
    texts = [
        "Maria Lopez, 34, moved to Madrid last spring.",
        "Tom is a 27 year old baker who lives in Leeds.",
        "In Osaka lives Kenji Sato; he turned 52 this year.",
    ]
    # run_batch traces the program, caches its constant prefix (the system turn) once, runs all three.
    for text, state in zip(texts, extract.run_batch([{"text": t} for t in texts], temperature=0)):
        person = json.loads(state["person"])
        print(f"{text}\n  -> {person}")
