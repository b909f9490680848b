"""Programs written against SGLang's own frontend (`import sglang as sgl`, `sgl.RuntimeEndpoint`),
in the style of SGLang's documentation, run against a radixflow server.

Run as `python tests/sglang_programs.py URL API_KEY [NAME ...]`; prints one JSON object
{name: {"ok": bool, "detail": str}}. tests/test_sglang_compat.py runs it in a subprocess: importing
sglang sets cache-folder environment variables and patches transformers, which must not leak into
the test session.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from collections.abc import Callable

import sglang as sgl

PROGRAMS: dict[str, Callable[[], str]] = {}


def program(fn: Callable[[], str]) -> Callable[[], str]:
    PROGRAMS[fn.__name__] = fn
    return fn


def check(cond: bool, detail: str) -> None:
    if not cond:
        raise AssertionError(detail)


@sgl.function
def multi_turn_question(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=12, temperature=0))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=12, temperature=0))


@program
def multi_turn_chat() -> str:
    state = multi_turn_question.run(question_1="What is the capital of France?",
                                    question_2="And of Germany?")
    check(state["answer_1"] != "" and state["answer_2"] != "", f"empty answers: {state.messages()}")
    check(len(state.messages()) == 5, f"expected 5 messages, got {len(state.messages())}")
    return f"{state['answer_1']!r} / {state['answer_2']!r}"


@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". I need to use a " + sgl.gen("tool", choices=["calculator",
                                                                                                  "search engine"])
    s += ". The answer is " + sgl.gen("answer", max_tokens=4, temperature=0)


@program
def select() -> str:
    state = tool_use.run(question="What is 37 times 12?")
    check(state["tool"] in ("calculator", "search engine"), f"tool = {state['tool']!r}")
    return state["tool"]


@sgl.function
def phone(s):
    s += "Call me at " + sgl.gen("number", regex=r"\d{3}-\d{4}", max_tokens=12, temperature=0.7)


@program
def regex() -> str:
    state = phone.run()
    check(re.fullmatch(r"\d{3}-\d{4}", state["number"]) is not None, f"number = {state['number']!r}")
    return state["number"]


@sgl.function
def count(s):
    s += "Q: How many legs does a spider have?\nA: " + sgl.gen("legs", dtype=int, max_tokens=6)


@program
def gen_int() -> str:
    state = count.run()
    check(isinstance(state["legs"], str) and re.fullmatch(r"-?\d+", state["legs"]) is not None,
          f"legs = {state['legs']!r}")
    return state["legs"]


CHARACTER_REGEX = (r"""\{\n"""
                   + r"""    "name": "[\w\d\s]{1,16}",\n"""
                   + r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
                   + r"""    "wand": \{\n"""
                   + r"""        "wood": "[\w\d\s]{1,16}",\n"""
                   + r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
                   + r"""    \},\n"""
                   + r"""    "alive": "(Alive|Deceased)"\n"""
                   + r"""\}""")


@sgl.function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=96, regex=CHARACTER_REGEX, temperature=0)


@program
def json_regex() -> str:
    state = character_gen.run(name="Hermione Granger")
    obj = json.loads(state["json_output"])
    check(obj["house"] in ("Gryffindor", "Slytherin", "Ravenclaw", "Hufflepuff"), f"house = {obj['house']!r}")
    return state["json_output"].replace("\n", " ")


CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                "country": {"type": "string", "maxLength": 16},
                                                "is_capital": {"type": "boolean"}},
               "required": ["city", "country", "is_capital"], "additionalProperties": False}


@sgl.function
def city_info(s):
    s += "Describe the capital of France in JSON.\n"
    s += sgl.gen("json_output", max_tokens=48, json_schema=json.dumps(CITY_SCHEMA), temperature=0)


@program
def json_schema() -> str:
    state = city_info.run()
    obj = json.loads(state["json_output"])
    check(set(obj) == {"city", "country", "is_capital"} and isinstance(obj["is_capital"], bool), f"obj = {obj!r}")
    return state["json_output"]


@sgl.function
def tip_suggestion(s):
    s += "Here are two tips for staying healthy: 1. Balanced Diet. 2. Regular Exercise.\n\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a paragraph:\n"
        f += sgl.gen("detailed_tip", max_tokens=10, stop="\n\n", temperature=0)
    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary" + sgl.gen("summary", max_tokens=8, temperature=0)


@program
def fork_join() -> str:
    state = tip_suggestion.run()
    text = state.text()
    check("Tip 1:" in text and "Tip 2:" in text and "In summary" in text, f"text = {text!r}")
    return state["summary"]


@sgl.function
def story(s):
    s += sgl.user("Tell me a very short story.")
    s += sgl.assistant(sgl.gen("story", max_tokens=16, temperature=0))


@program
def streaming() -> str:
    state = story.run(stream=True)
    pieces = list(state.text_iter(var_name="story"))
    joined = "".join(pieces)
    check(len(pieces) >= 2, f"got {len(pieces)} stream pieces")
    check(joined == state["story"], f"streamed {joined!r} != final {state['story']!r}")
    return f"{len(pieces)} pieces"


@sgl.function
def text_qa(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=8, temperature=0)


@program
def run_batch() -> str:
    states = text_qa.run_batch([{"question": "What is the capital of the United Kingdom?"},
                                {"question": "What is the capital of France?"},
                                {"question": "What is the capital of Japan?"}], progress_bar=False)
    answers = [st["answer"] for st in states]
    check(len(answers) == 3 and all(isinstance(a, str) for a in answers), f"answers = {answers!r}")
    return repr(answers)


@sgl.function
def at_least(s):
    s += "Say hi." + sgl.gen("out", min_tokens=6, max_tokens=8, stop=".", temperature=0)


@program
def min_tokens() -> str:
    state = at_least.run()
    n = state.get_meta_info("out")["completion_tokens"]
    check(n >= 6, f"completion_tokens = {n}")
    return f"{n} tokens"


@sgl.function
def numbered(s):
    s += "Count to ten: 1, 2, 3," + sgl.gen("rest", stop_regex=r"[5-9],", max_tokens=24, temperature=0)


@program
def stop_regex() -> str:
    state = numbered.run()
    meta = state.get_meta_info("rest")
    check(meta["finish_reason"]["type"] == "stop", f"finish_reason = {meta['finish_reason']}")
    check(re.search(r"[5-9],", state["rest"]) is None, f"rest = {state['rest']!r} not trimmed")
    return repr(state["rest"])


LONG_PREFIX = ("You are a careful assistant that answers questions about geography with one short "
               "sentence, naming the country and the city without extra words.\n")


@sgl.function
def geo(s, question):
    s += LONG_PREFIX
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, stop="\n", temperature=0)


@program
def cache_prefix() -> str:
    backend = sgl.global_config.default_backend
    backend.flush_cache()
    geo.cache(backend)  # traces the program and sends its constant prefix to be cached
    state = geo.run(question="Where is Lyon?")
    cached = state.get_meta_info("answer")["cached_tokens"]
    check(cached >= 20, f"cached_tokens = {cached}")
    return f"{cached} cached tokens"


@program
def server_info() -> str:
    info = sgl.get_server_info()
    check("model_path" in info, f"server_info keys: {sorted(info)[:10]}")
    return info["model_path"]


def main() -> None:
    url, api_key, *names = sys.argv[1:]
    # SmolLM2 speaks ChatML; SGLang's registry does not know the model's path, so name the template.
    sgl.set_default_backend(sgl.RuntimeEndpoint(url, api_key=api_key, chat_template_name="chatml"))
    results = {}
    for name in names or PROGRAMS:
        try:
            results[name] = {"ok": True, "detail": PROGRAMS[name]()}
        except Exception as e:  # one program's failure is its result, the others still run
            results[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"[:800],
                             "traceback": traceback.format_exc()[-1500:]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
