"""The DSL without a model: IR, chat-template affixes, choice scoring, tracer, interpreter semantics
(on a scripted fake backend that records every request)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import radixflow as rf
from radixflow.frontend import ir
from radixflow.frontend.backend import Backend, BackendError, InvalidRequestError
from radixflow.frontend.chat_template import BUILTIN_TEMPLATES, ChatTemplate, guess_builtin
from radixflow.frontend.choices import (
    choice_tokens,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixflow.frontend.tracer import trace_prefix


class FakeBackend(Backend):
    """Answers gen with "<k>" (k = how many gens it saw), streams it char by char; records requests.
    A prompt containing "FAIL" is refused like a server would refuse it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.delay = delay
        self.template = ChatTemplate.builtin("chatml")

    def _one(self, prompt: str, sp: dict) -> dict:
        if "FAIL" in prompt:
            raise InvalidRequestError("prompt refused: FAIL", 400)
        time.sleep(self.delay)
        with self.lock:
            self.requests.append((prompt, dict(sp)))
            k = sum(1 for _, p in self.requests if p.get("max_new_tokens", 1) != 0)
        text = "" if sp.get("max_new_tokens") == 0 else f"<{k}>"
        return {"text": text, "output_ids": [], "meta_info": {"prompt_tokens": len(prompt), "cached_tokens": 0,
                                                              "sampling_params": dict(sp)}}

    def generate(self, prompt=None, sampling_params=None, *, input_ids=None, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False):
        if isinstance(prompt, list):
            sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompt)
            return [self._one(p, s or {}) for p, s in zip(prompt, sps)]
        return self._one(prompt, sampling_params or {})

    def generate_stream(self, prompt, sampling_params=None, **options):
        final = self._one(prompt, sampling_params or {})
        for i in range(1, len(final["text"]) + 1):
            time.sleep(0.01)
            yield {**final, "text": final["text"][:i]}

    def chat_template(self):
        return self.template


@pytest.fixture()
def fake():
    return FakeBackend()


# ---- IR and gen arguments --------------------------------------------------------------------

def test_expressions_concatenate_and_flatten():
    e = "a" + rf.gen("x") + "b" + (rf.user("u") + "c")
    kinds = [type(x).__name__ for x in ir.flatten(e)]
    assert kinds == ["Constant", "Gen", "Constant", "RoleBegin", "Constant", "RoleEnd", "Constant"]
    assert ir.var_names(e) == ["x"]
    with pytest.raises(TypeError):
        ir.to_expr(3)


def test_gen_arguments_map_to_wire_names_and_inherit():
    g = rf.gen("x", max_tokens=5, stop="\n", temperature=0.0, json_schema={"type": "integer"})
    run_defaults = ir.SamplingArgs(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=("END",))
    wire = g.args.over(run_defaults).wire(extra_stop=("<|im_end|>",))
    assert wire == {"max_new_tokens": 5, "stop": ["\n", "<|im_end|>"], "temperature": 0.0, "top_p": 0.9,
                    "json_schema": json.dumps({"type": "integer"})}
    assert rf.gen("y", return_logprob=True, top_logprobs_num=2).args.logprob_options() == {
        "return_logprob": True, "top_logprobs_num": 2}


def test_typed_gens_use_the_grammar_regexes():
    from radixflow.grammars.regex_utils import BOOL_REGEX, FLOAT_REGEX, INT_REGEX, STRING_REGEX

    assert rf.gen_int("n").args.regex == INT_REGEX
    assert rf.gen_string("s").args.regex == STRING_REGEX
    assert rf.gen("f", dtype=float).args.regex == FLOAT_REGEX
    assert rf.gen("b", dtype="bool").args.regex == BOOL_REGEX
    with pytest.raises(ValueError, match="at most one"):
        rf.gen("x", dtype=int, regex="[0-9]+")
    with pytest.raises(ValueError, match="dtype"):
        rf.gen("x", dtype=list)


def test_gen_with_choices_is_a_select_and_select_validates():
    s = rf.gen("c", choices=["a", "b"], choices_method=greedy_token_selection)
    assert isinstance(s, ir.Select) and s.choices == ("a", "b") and s.method is greedy_token_selection
    with pytest.raises(ValueError):
        rf.select("c", [])
    with pytest.raises(ValueError):
        rf.select("c", ["a", ""])
    with pytest.raises(ValueError):
        rf.select("c", "ab")


# ---- chat templates ----------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("skip_system", [False, True])
def test_role_affixes_rebuild_the_template_rendering(name, skip_system):
    """Appending prefix + content + suffix per message gives exactly what the template renders, and
    an open assistant role starts with the template's generation prompt."""
    t = ChatTemplate.builtin(name)
    msgs = CONVERSATION[1:] if skip_system else CONVERSATION
    text, history = "", []
    for m in msgs:
        prefix, suffix = t.role_affixes(history, m["role"])
        text += prefix + m["content"] + suffix
        history.append(m)
    assert text == t.render(msgs, False)
    prefix, _ = t.role_affixes(msgs, "assistant")
    if name == "default":  # its generation prompt "Assistant:" lacks the space its messages have
        assert (text + prefix).startswith(t.render(msgs, True))
    else:
        assert text + prefix == t.render(msgs, True)


def test_builtin_template_matches_the_default_models_own(tokenizer):
    own = tokenizer.apply_chat_template(CONVERSATION[1:], add_generation_prompt=True)
    assert ChatTemplate.builtin(guess_builtin(tokenizer.path)).render(CONVERSATION[1:], True) == own
    assert ChatTemplate.builtin("smollm2").stop_strings == tuple(tokenizer.chat_stop_strings)


def test_guess_builtin_by_model_name():
    assert guess_builtin("/m/Meta-Llama-3-8B-Instruct") == "llama-3"
    assert guess_builtin("Qwen/Qwen2-0.5B-Instruct") == "qwen2"
    assert guess_builtin("mistralai/Mistral-7B-Instruct-v0.2") == "mistral"
    assert guess_builtin("/x/SmolLM2-135M-Instruct") == "smollm2"
    assert guess_builtin("/x/unknown") == "default"


# ---- choices -----------------------------------------------------------------------------------

def test_choice_tokens_heals_the_boundary_token():
    # prompt "A: " = ["A", ":", " "]; prompt + "yes" = ["A", ":", " yes"]; entries from position N-2 = 1.
    healed = [[-0.1, 10, ":"], [-2.0, 11, " yes"]]
    assert choice_tokens("A: ", "yes", healed, boundary=1) == [[-2.0, 11, " yes"]]
    # prompt + "42" = ["A", ":", " ", "4", "2"]: the space is prompt-only.
    plain = [[-0.1, 10, ":"], [-0.5, 12, " "], [-1.0, 13, "4"], [-1.5, 14, "2"]]
    assert choice_tokens("A: ", "42", plain, boundary=1) == plain[2:]
    # a decoder that drops lone-token spaces: fall back to the boundary token rule.
    lossy = [[-0.1, 10, ":"], [-2.0, 11, "yes"]]
    assert choice_tokens("A: ", "yes", lossy, boundary=1) == [[-2.0, 11, "yes"]]
    lossy_no_heal = [[-0.1, 10, ":"], [-0.5, 12, " "], [-1.0, 13, "42"]]
    assert choice_tokens("A: ", "42", lossy_no_heal, boundary=1) == [[-1.0, 13, "42"]]


def test_choices_methods():
    choices = ["organ", "organism", "antidisestablishmentarianism"]
    toks = [[[-0.3, 1, None]], [[-0.3, 1, None], [-0.5, 2, None]],
            [[-0.4, 3, None], [-0.1, 4, None], [-0.05, 5, None], [-0.0001, 6, None]]]
    norm = [sum(e[0] for e in t) / len(t) for t in toks]
    assert token_length_normalized(choices=choices, normalized_prompt_logprobs=norm,
                                   input_token_logprobs=toks).decision == "antidisestablishmentarianism"
    # greedy: organ and organism tie on the first token; organ's padding (-0.3) beats -0.5.
    assert greedy_token_selection(choices=choices, normalized_prompt_logprobs=norm,
                                  input_token_logprobs=toks).decision == "organ"
    uncond = [[[None, 1, None]], [[None, 1, None], [-5.0, 2, None]],
              [[None, 3, None], [-0.1, 4, None], [-0.1, 5, None], [-0.0001, 6, None]]]
    d = unconditional_likelihood_normalized(choices=choices, normalized_prompt_logprobs=norm,
                                            input_token_logprobs=toks, unconditional_token_logprobs=uncond)
    assert d.decision == "organism"  # -0.5 - (-5.0) lifts it
    with pytest.raises(ValueError):
        unconditional_likelihood_normalized(choices=choices, normalized_prompt_logprobs=norm,
                                            input_token_logprobs=toks)


# ---- tracer ------------------------------------------------------------------------------------

def test_tracer_finds_the_constant_prefix():
    template = ChatTemplate.builtin("chatml")

    def prog(s, question, shots):
        s += rf.system("You answer math questions.")
        s += "Examples follow.\n"
        for q, a in shots:  # needs a real list: tracing stops here
            s += f"Q: {q}\nA: {a}\n"
        s += rf.user(f"Question: {question}") + rf.assistant(rf.gen("a"))

    prefix = trace_prefix(prog, {}, template)
    assert prefix == "<|im_start|>system\nYou answer math questions.<|im_end|>\nExamples follow.\n"
    bound = trace_prefix(prog, {"shots": [("1+1", "2")]}, template)
    assert bound == prefix + "Q: 1+1\nA: 2\n<|im_start|>user\nQuestion: "

    def reads_state(s):
        s += "A" + rf.gen("x") + "B"
        s += s["x"]

    assert trace_prefix(reads_state, {}, template) == "A"


# ---- interpreter semantics on the fake backend ----------------------------------------------------

def test_run_text_variables_roles_and_defaults(fake):
    @rf.function
    def prog(s, topic):
        s += rf.system("sys")
        s += rf.user("Tell me about " + topic)
        s += rf.assistant(rf.gen("answer", max_tokens=3))
        s += "after:" + rf.gen("tail")
        return "done"

    st = prog.run(topic="cats", backend=fake, temperature=0.5, max_new_tokens=9)
    assert st.ret_value == "done"
    assert st["answer"] == "<1>" and st["tail"] == "<2>"
    assert st.text() == ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nTell me about cats<|im_end|>\n"
                         "<|im_start|>assistant\n<1><|im_end|>\nafter:<2>")
    assert st.messages() == [{"role": "system", "content": "sys"}, {"role": "user", "content": "Tell me about cats"},
                             {"role": "assistant", "content": "<1>"}]
    (p1, sp1), (p2, sp2) = fake.requests
    assert p1.endswith("<|im_start|>assistant\n") and p2.endswith("after:")
    assert sp1 == {"max_new_tokens": 3, "temperature": 0.5, "stop": ["<|im_end|>"]}  # chat stop inside assistant
    assert sp2 == {"max_new_tokens": 9, "temperature": 0.5}
    assert st.get_meta_info("answer")["sampling_params"] == sp1


def test_role_context_managers_and_begin_end_forms(fake):
    @rf.function
    def prog(s):
        with s.user():
            s += "q1"
        s += rf.assistant_begin() + rf.gen("a", max_tokens=2) + rf.assistant_end()
        s.user("q2")

    st = prog.run(backend=fake)
    assert [m["role"] for m in st.messages()] == ["user", "assistant", "user"]
    assert st.messages()[1]["content"] == "<1>"


def test_mismatched_roles_raise(fake):
    @rf.function
    def prog(s):
        s += rf.user_begin() + "x" + rf.assistant_end()

    with pytest.raises(ValueError, match="does not match"):
        prog.run(backend=fake)


def test_fork_commits_prefix_once_and_join_gathers(fake):
    @rf.function
    def prog(s):
        s += "Prefix."
        forks = s.fork(3)
        forks += lambda i: f" branch {i}:" + rf.gen("x", max_tokens=2)
        forks += rf.gen("y")
        forks.join()
        return [f.text() for f in forks]

    st = prog.run(backend=fake)
    commits = [p for p, sp in fake.requests if sp == {"max_new_tokens": 0}]
    assert commits == ["Prefix."]
    # Branches run concurrently, so the fake's counter interleaves between x and y gens.
    assert len(st["x"]) == len(st["y"]) == 3
    assert sorted(st["x"] + st["y"]) == [f"<{i}>" for i in range(1, 7)]
    for i, text in enumerate(st.ret_value):
        assert text.startswith(f"Prefix. branch {i}:")
    assert st.text() == "Prefix."


def test_forks_do_not_wait_for_each_others_commits():
    """Forking several nodes sends their commits together (the caller does not wait for each), and
    every branch's first request comes after its own node's commit has finished."""

    class PairedCommits(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.barrier = threading.Barrier(2, timeout=30)
            self.serialized = False

        def cache_prefix(self, text):
            if text.startswith("root "):  # the two second-level commits must be in flight at once
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    self.serialized = True
            return super().cache_prefix(text)

    fake = PairedCommits()

    @rf.function
    def prog(s):
        s += "root"
        level1 = s.fork(2)
        level1 += lambda i: f" {i}" + rf.gen("a")
        leaves = [leaf for node in level1 for leaf in node.fork(2)]
        for leaf in leaves:
            leaf += "!" + rf.gen("b")
        return [leaf.text() for leaf in leaves]

    st = prog.run(backend=fake)
    assert not fake.serialized
    assert len(st.ret_value) == 4 and all(t.endswith(">") for t in st.ret_value)
    prompts = [p for p, _ in fake.requests]
    for node in {t[:t.index("!")] for t in st.ret_value}:
        commit = prompts.index(node)
        assert all(prompts.index(p) > commit for p in prompts if p.startswith(node + "!"))


def test_fork_on_empty_state_and_nested_forks(fake):
    @rf.function
    def prog(s):
        outer = s.fork(2)
        for i, b in enumerate(outer):
            b += f"b{i}"
            inner = b.fork(2)
            inner += rf.gen("leaf")
            inner.join()
        outer.join()

    st = prog.run(backend=fake)
    assert len(st["leaf"]) == 2 and all(len(x) == 2 for x in st["leaf"])
    assert sorted(p for p, sp in fake.requests if sp == {"max_new_tokens": 0}) == ["b0", "b1"]


def test_copy_joins_back_on_exit(fake):
    @rf.function
    def prog(s):
        s += "base"
        with s.copy() as c:
            c += "+side" + rf.gen("side")
        s += "!"

    st = prog.run(backend=fake)
    assert st.text() == "base!" and st["side"] == ["<1>"]
    assert [p for p, sp in fake.requests if sp.get("max_new_tokens") != 0] == ["base+side"]


def test_join_concatenate_and_append(fake):
    @rf.function
    def prog(s):
        s += "P:"
        f = s.fork(2)
        f += ["A", "B"]
        f.join("concate_and_append")
        s += "."

    assert prog.run(backend=fake).text() == "P:AB."


def test_errors_surface_in_the_caller_with_the_message(fake):
    @rf.function
    def prog(s):
        s += "FAIL " + rf.gen("x")
        s += "more" + rf.gen("y")

    with pytest.raises(InvalidRequestError, match="prompt refused"):
        prog.run(backend=fake)
    with pytest.raises(BackendError):
        prog.run_batch([{}, {}], backend=fake)
    st = prog.run(backend=fake, stream=True)
    with pytest.raises(InvalidRequestError):
        list(st.text_iter())

    @rf.function
    def body_raises(s):
        s += "x"
        raise KeyError("from the body")

    with pytest.raises(KeyError):
        body_raises.run(backend=fake)
    with pytest.raises(KeyError):
        list(body_raises.run(backend=fake, stream=True).text_iter())


def test_streaming_yields_pieces_of_the_final_text(fake):
    @rf.function
    def prog(s):
        s += "Hello " + rf.gen("a") + " and " + rf.gen("b")

    st = prog.run(backend=fake, stream=True)
    pieces = list(st.text_iter())
    assert len(pieces) > 4 and "".join(pieces) == st.text() == "Hello <1> and <2>"
    st = prog.run(backend=fake, stream=True)
    assert list(st.text_iter("b")) == ["<", "4", ">"] and st["a"] == "<3>"

    async def collect():
        st = prog.run(backend=fake, stream=True)
        return [p async for p in st.text_async_iter("a")]

    assert "".join(asyncio.run(collect())) == "<5>"
    st = prog.run(backend=fake, stream=True)
    b = st["b"]  # read at once from outside: waits for the body to queue and run it
    assert b.startswith("<") and b.endswith(">") and st.text().endswith(" and " + b)
    with pytest.raises(KeyError):
        st["never_set"]


def test_variables_are_waited_for_individually():
    slow = FakeBackend(delay=0.2)

    @rf.function
    def prog(s):
        s += "a" + rf.gen("x")
        s += "b" + rf.gen("y")
        t0 = time.perf_counter()
        x = s["x"]
        return x, time.perf_counter() - t0

    st = prog.run(backend=slow)
    x, waited = st.ret_value
    assert x == "<1>" and waited < 0.35 and st["y"] == "<2>"


def test_run_batch_caches_the_traced_prefix_once(fake):
    @rf.function
    def prog(s, q):
        s += "Shared instructions. " + "Q: " + q + "\nA:" + rf.gen("a", max_tokens=2)

    states = prog.run_batch([{"q": str(i)} for i in range(5)], backend=fake, temperature=0)
    assert [fake.requests[0][0], fake.requests[0][1]] == ["Shared instructions. Q: ", {"max_new_tokens": 0}]
    assert sum(1 for _, sp in fake.requests if sp.get("max_new_tokens") == 0) == 1
    assert [s.text() for s in states] == [f"Shared instructions. Q: {i}\nA:{s['a']}" for i, s in enumerate(states)]
    assert all(sp.get("temperature") == 0 for _, sp in fake.requests[1:])


def test_run_batch_starts_the_programs_while_the_commit_is_in_flight():
    """The programs' bodies run while the prefix commit is still pending (an in-process engine
    computes it while they arrive); each program's first request waits for the commit."""
    n = 4
    started: list[int] = []
    committed = threading.Event()
    timed_out: list[bool] = []

    class SlowCommit(FakeBackend):
        def cache_prefix_async(self, text):
            from concurrent.futures import Future

            fut: Future = Future()

            def finish() -> None:
                deadline = time.monotonic() + 10
                while len(started) < n and time.monotonic() < deadline:
                    time.sleep(0.005)
                timed_out.append(len(started) < n)
                self.cache_prefix(text)
                committed.set()
                fut.set_result(None)

            threading.Thread(target=finish, daemon=True).start()
            return fut

        def _one(self, prompt, sp):
            if sp.get("max_new_tokens") != 0:
                assert committed.is_set(), "a program's request went out before the commit finished"
            return super()._one(prompt, sp)

    fake = SlowCommit()

    @rf.function
    def prog(s, q):
        started.append(q)
        s += "Shared instructions. Q: " + str(q) + rf.gen("a", max_tokens=2)

    states = prog.run_batch([{"q": i} for i in range(n)], backend=fake)
    assert timed_out == [False], "run_batch waited for the commit before starting the programs"
    assert fake.requests[0][1] == {"max_new_tokens": 0}
    assert all(st["a"].startswith("<") for st in states)


def test_run_batch_programs_run_on_their_pool_threads_and_forks_still_branch():
    """A run_batch program's own requests are sent from its pool thread (no worker thread per
    program); its forks' branches still run on worker threads of their own; a failure still
    stops the program."""

    class Recording(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.threads: list[tuple[str, str]] = []

        def _one(self, prompt, sp):
            with self.lock:
                self.threads.append((prompt, threading.current_thread().name))
            return super()._one(prompt, sp)

    rec = Recording()

    @rf.function
    def prog(s, q):
        s += f"Q{q}:" + rf.gen("a", max_tokens=2)
        forks = s.fork(3)
        forks += lambda i: f" branch {i}" + rf.gen("b", max_tokens=2)
        forks.join()

    states = prog.run_batch([{"q": i} for i in range(2)], backend=rec, cache_prefix=False)
    own = [name for prompt, name in rec.threads if prompt in ("Q0:", "Q1:")]
    assert len(own) == 2 and all(name.startswith("radixflow-prog_") for name in own), rec.threads
    branches = [name for prompt, name in rec.threads if "branch" in prompt]
    assert len(branches) == 6 and all(name == "radixflow-program" for name in branches), rec.threads
    assert all(len(st["b"]) == 3 for st in states)

    @rf.function
    def failing(s):
        s += "FAIL " + rf.gen("x")
        s += "never" + rf.gen("y")

    with pytest.raises(InvalidRequestError, match="prompt refused"):
        failing.run_batch([{}, {}], backend=rec)
    assert not any("never" in prompt for prompt, _ in rec.threads)


def test_run_batch_announces_the_requests_that_start_at_once():
    """run_batch hints the commit plus one request per program that can start now (num_threads),
    so an engine never waits for programs that are queued behind others."""

    class Hinted(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.hints: list[int] = []

        def expect_requests(self, n):
            self.hints.append(n)

    fake = Hinted()

    @rf.function
    def prog(s, q):
        s += "Shared instructions. Q: " + q + rf.gen("a", max_tokens=2)

    prog.run_batch([{"q": str(i)} for i in range(5)], backend=fake, num_threads=2)
    prog.run_batch([{"q": str(i)} for i in range(5)], backend=fake, cache_prefix=False)
    prog.run_batch([{"q": "one"}], backend=fake)
    assert fake.hints == [3, 5]


def test_bind_call_and_default_backend(fake):
    @rf.function
    def inner(s, word):
        s += word + rf.gen("g")

    @rf.function
    def outer(s, word):
        s += "<"
        inner(s, word)
        s += ">"

    with pytest.raises(RuntimeError, match="no backend"):
        outer.run(word="x")
    rf.set_default_backend(fake)
    try:
        assert outer.bind(word="hi").run().text() == "<hi<1>>"
    finally:
        rf.set_default_backend(None)
    with pytest.raises(TypeError):
        outer.bind(nope=1)
    with pytest.raises(TypeError):
        rf.set_default_backend("http://x")


def test_select_on_fake_logprobs():
    class Scored(FakeBackend):
        """Every prompt token scores -1 except the choice tokens, scored by the choice text."""

        def generate(self, prompt=None, sampling_params=None, *, input_ids=None, return_logprob=False,
                     logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False):
            if not return_logprob:
                return super().generate(prompt, sampling_params)
            out = []
            for text in prompt:
                # char-level "tokens"; the prompt has a trailing space -> position N-1 is " ".
                entries = [[-1.0, ord(c), c] for c in text][logprob_start_len:]
                choice = text[len("Pick: "):]
                for e in entries[-len(choice):]:
                    e[0] = -0.5 if choice == "good" else -2.0
                out.append({"text": "", "meta_info": {"input_token_logprobs": entries}})
            return out

    backend = Scored()

    @rf.function
    def prog(s):
        s += "Pick: " + rf.select("c", ["bad", "good", "ugly"])

    st = prog.run(backend=backend)
    meta = st.get_meta_info("c")
    assert st["c"] == "good" and st.text() == "Pick: good"
    assert meta["normalized_prompt_logprobs"] == [-2.0, -0.5, -2.0]
    assert ["".join(e[2] for e in t) for t in meta["input_token_logprobs"]] == ["bad", "good", "ugly"]
