"""Constrained decoding end to end on the default model: every output satisfies its spec.

Suites of real-world JSON schemas and regexes run as one batched `generate` call each, greedy
and sampled; jump-forward on vs off; constrained and unconstrained requests mixed in a batch;
bad specs refused with their reason while the engine keeps serving.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from radixflow.runtime.engine import GenerationError

SHORT = {"type": "string", "minLength": 1, "maxLength": 24}
NAME = {"type": "string", "minLength": 1, "maxLength": 20}
DATE = {"type": "string", "format": "date"}


def obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    """An object schema; every property is required unless `required` says otherwise."""
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


ADDRESS = obj({"street": SHORT, "city": NAME, "zip": {"type": "string", "pattern": r"[0-9]{5}"},
               "country": {"type": "string", "enum": ["US", "CA", "MX", "GB", "DE", "FR"]}})

# (name, what the prompt asks for, schema)
SCHEMAS: list[tuple[str, str, dict]] = [
    ("person", "a person with a name, an age and an email address",
     obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
          "email": {"type": "string", "format": "email"}})),
    ("address", "a postal address in the United States", ADDRESS),
    ("contact_card", "a contact card with a name, phone numbers and an address",
     obj({"name": NAME,
          "phones": {"type": "array", "items": {"type": "string", "pattern": r"\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}"},
                     "minItems": 1, "maxItems": 2},
          "address": {"$ref": "#/$defs/address"}}, **{"$defs": {"address": ADDRESS}})),
    ("invoice", "an invoice with line items",
     obj({"invoice_id": {"type": "string", "pattern": r"INV-[0-9]{4}"},
          "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"$ref": "#/$defs/line"}},
          "currency": {"enum": ["USD", "EUR", "GBP"]},
          "total": {"type": "number", "minimum": 0, "maximum": 100000}},
         **{"$defs": {"line": obj({"sku": {"type": "string", "maxLength": 8},
                                   "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                   "unit_price": {"type": "number", "minimum": 0, "maximum": 1000}})}})),
    ("product", "a product catalog entry",
     obj({"sku": {"type": "string", "pattern": r"[A-Z]{3}-[0-9]{3}"}, "title": SHORT,
          "price": {"type": "number", "minimum": 0, "maximum": 10000},
          "in_stock": {"type": "boolean"},
          "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
         required=["sku", "title", "price", "in_stock"])),
    ("calendar_event", "a calendar event for a team meeting",
     obj({"title": SHORT, "date": DATE, "start": {"type": "string", "pattern": r"[0-2][0-9]:[0-5][0-9]"},
          "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
          "attendees": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 2}})),
    ("github_issue", "a GitHub issue about a crash",
     obj({"number": {"type": "integer", "minimum": 1, "maximum": 99999}, "title": SHORT,
          "state": {"enum": ["open", "closed"]},
          "labels": {"type": "array", "items": {"enum": ["bug", "enhancement", "question", "docs"]}, "maxItems": 3},
          "assignee": {"anyOf": [NAME, {"type": "null"}]}})),
    ("weather_report", "a weather report for Paris",
     obj({"city": NAME, "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
          "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "storm"]},
          "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
          "wind_kph": {"type": "integer", "minimum": 0, "maximum": 300}})),
    ("recipe", "a recipe for pancakes",
     obj({"name": SHORT, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
          "ingredients": {"type": "array", "items": obj({"item": NAME, "amount": {"type": "string",
                                                                                   "maxLength": 10}}),
                          "minItems": 1, "maxItems": 3},
          "vegetarian": {"type": "boolean"}})),
    ("tool_call", "a call of the get_weather tool for Berlin",
     obj({"name": {"enum": ["get_weather", "search_web", "send_email"]},
          "arguments": obj({"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                           required=["location"])})),
    ("classification", "the sentiment classification of 'I love this phone'",
     obj({"label": {"enum": ["positive", "negative", "neutral"]},
          "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("book", "a book record",
     obj({"title": SHORT, "author": NAME, "year": {"type": "integer", "minimum": 1450, "maximum": 2025},
          "isbn": {"type": "string", "pattern": r"97[89]-[0-9]{10}"}})),
    ("user_profile", "a user profile with optional fields",
     obj({"username": {"type": "string", "pattern": r"[a-z][a-z0-9_]{2,11}"}, "display_name": NAME,
          "bio": {"type": "string", "maxLength": 30}, "verified": {"type": "boolean"}},
         required=["username", "verified"])),
    ("order_status", "the status of an online order",
     obj({"order_id": {"type": "integer", "minimum": 1000, "maximum": 9999},
          "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
          "eta": DATE})),
    ("flight", "a flight booking from SFO to JFK",
     obj({"flight_number": {"type": "string", "pattern": r"[A-Z]{2}[0-9]{2,4}"},
          "from": {"type": "string", "pattern": r"[A-Z]{3}"}, "to": {"type": "string", "pattern": r"[A-Z]{3}"},
          "departure": {"type": "string", "format": "date-time"},
          "seat": {"type": "string", "pattern": r"[0-9]{1,2}[A-F]"}})),
    ("movie_review", "a short movie review",
     obj({"movie": SHORT, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
          "summary": {"type": "string", "maxLength": 40}, "recommend": {"type": "boolean"}})),
    ("geo_point", "the coordinates of Tokyo",
     obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
          "lon": {"type": "number", "minimum": -180, "maximum": 180}, "label": NAME})),
    ("shape", "a geometric shape (a circle or a rectangle)",
     {"oneOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 100}}),
                obj({"kind": {"const": "rectangle"}, "width": {"type": "integer", "minimum": 1, "maximum": 100},
                     "height": {"type": "integer", "minimum": 1, "maximum": 100}})]}),
    ("payment", "a payment made by card or bank transfer",
     obj({"amount": {"type": "integer", "minimum": 1, "maximum": 50000},
          "method": {"anyOf": [obj({"card_last4": {"type": "string", "pattern": r"[0-9]{4}"}}),
                               obj({"iban": {"type": "string", "pattern": r"[A-Z]{2}[0-9]{6}"}})]}})),
    ("api_response", "an API error response",
     obj({"ok": {"const": False}, "error": obj({"code": {"type": "integer", "minimum": 400, "maximum": 599},
                                                "message": {"type": "string", "maxLength": 30}})})),
    ("log_entry", "a server log entry",
     obj({"timestamp": {"type": "string", "format": "date-time"},
          "level": {"enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
          "message": {"type": "string", "maxLength": 30}, "host": {"type": "string", "format": "ipv4"}})),
    ("employee", "an employee record with a manager",
     obj({"id": {"type": "integer", "minimum": 1, "maximum": 100000}, "name": NAME,
          "department": {"enum": ["engineering", "sales", "marketing", "hr"]},
          "manager": {"anyOf": [{"$ref": "#/$defs/ref"}, {"type": "null"}]}},
         **{"$defs": {"ref": obj({"id": {"type": "integer", "minimum": 1, "maximum": 100000}, "name": NAME})}})),
    ("todo_list", "a todo list with two tasks",
     obj({"list": NAME, "tasks": {"type": "array", "minItems": 1, "maxItems": 3,
                                  "items": obj({"task": SHORT, "done": {"type": "boolean"}})}})),
    ("color_palette", "a color palette of three colors",
     obj({"name": NAME, "colors": {"type": "array", "minItems": 3, "maxItems": 3,
                                   "items": {"type": "string", "pattern": r"#[0-9a-f]{6}"}}})),
    ("server_config", "a web server configuration",
     obj({"host": {"type": "string", "format": "ipv4"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
          "tls": {"type": "boolean"}, "workers": {"type": "integer", "minimum": 1, "maximum": 64}})),
    ("http_request", "an HTTP request description",
     obj({"method": {"enum": ["GET", "POST", "PUT", "DELETE"]},
          "path": {"type": "string", "pattern": r"/[a-z]{1,10}(/[a-z0-9]{1,10}){0,2}"},
          "status": {"type": "integer", "minimum": 100, "maximum": 599}})),
    ("translation", "the French translation of 'good morning'",
     obj({"source_lang": {"const": "en"}, "target_lang": {"enum": ["fr", "de", "es"]},
          "text": {"type": "string", "maxLength": 30}})),
    ("sports_score", "the final score of a football match",
     obj({"home": NAME, "away": NAME, "home_score": {"type": "integer", "minimum": 0, "maximum": 20},
          "away_score": {"type": "integer", "minimum": 0, "maximum": 20}})),
    ("stock_quote", "a stock quote for Apple",
     obj({"ticker": {"type": "string", "pattern": r"[A-Z]{1,5}"},
          "price": {"type": "number", "minimum": 0, "maximum": 10000},
          "change_pct": {"type": "number", "minimum": -100, "maximum": 100}})),
    ("survey_answer", "an answer to a customer satisfaction survey",
     obj({"question_id": {"type": "integer", "minimum": 1, "maximum": 50},
          "score": {"enum": [1, 2, 3, 4, 5]}, "comment": {"type": ["string", "null"], "maxLength": 30}})),
    ("medication", "a medication prescription",
     obj({"drug": NAME, "dose_mg": {"type": "integer", "minimum": 1, "maximum": 1000},
          "frequency": {"enum": ["once daily", "twice daily", "as needed"]},
          "refills": {"type": "integer", "minimum": 0, "maximum": 5}})),
    ("vehicle", "a used car listing",
     obj({"make": NAME, "model": NAME, "year": {"type": "integer", "minimum": 1990, "maximum": 2025},
          "mileage_km": {"type": "integer", "minimum": 0, "maximum": 500000},
          "fuel": {"enum": ["petrol", "diesel", "electric", "hybrid"]}})),
    ("nested_tree", "a small folder tree",
     obj({"name": NAME, "children": {"type": "array", "maxItems": 2,
                                     "items": obj({"name": NAME, "size_kb": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9999}})}})),
]

# (name, what the prompt asks for, regex); each must match the whole output.
REGEXES: list[tuple[str, str, str]] = [
    ("ipv4", "the IPv4 address of a home router",
     r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"),
    ("iso_date", "the date of New Year's Day 2024 in ISO format", r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("time_24h", "the time noon in 24-hour HH:MM:SS format", r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"),
    ("email", "an email address for John Smith", r"[a-z][a-z0-9._]{0,15}@[a-z]{2,12}\.(com|org|net|io)"),
    ("us_phone", "a US phone number", r"\([2-9][0-9]{2}\) [0-9]{3}-[0-9]{4}"),
    ("us_zip", "the ZIP code of Beverly Hills", r"[0-9]{5}(-[0-9]{4})?"),
    ("hex_color", "the hex color code of pure red", r"#[0-9a-fA-F]{6}"),
    ("uuid", "a random UUID", r"[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
    ("semver", "the version number of a software release",
     r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})(-(alpha|beta|rc)\.[0-9])?"),
    ("yes_no", "whether Paris is in France (yes, no or maybe)", r"(yes|no|maybe)"),
    ("repeat_2_4", "two to four capital letters", r"[A-Z]{2,4}"),
    ("mac_address", "a MAC address", r"([0-9A-F]{2}:){5}[0-9A-F]{2}"),
    ("url", "the URL of a website", r"https?://(www\.)?[a-z]{2,15}\.(com|org|net)(/[a-z]{1,10}){0,2}"),
    ("price", "the price of a coffee in dollars", r"\$[0-9]{1,3}\.[0-9]{2}"),
    ("time_12h", "a time in 12-hour format with AM or PM", r"(1[0-2]|[1-9]):[0-5][0-9] (AM|PM)"),
    ("credit_card", "a masked credit card number", r"(\*{4}-){3}[0-9]{4}"),
    ("word_list", "three fruits separated by commas", r"[a-z]{3,10}(, [a-z]{3,10}){2}"),
    ("sentence", "a one-sentence greeting", r"[A-Z][a-z]{0,10}( [a-z]{1,10}){1,6}[.!]"),
]

JSON_MAX_NEW, REGEX_MAX_NEW = 96, 48
MIN_STOP_SHARE = 0.8  # most outputs must end on their own: the suite cannot pass by being cut
DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                       r"([Zz]|[+-][0-9]{2}:[0-9]{2})")

# String formats as xgrammar enforces them. Its formats are syntactic, looser than jsonschema's
# own checkers: "ipv4" allows leading zeros ("1.2.3.091", which Python's ipaddress refuses) and
# "date" allows day 31 in any month ("2023-02-31"). jsonschema leaves "date-time" unchecked
# without the optional rfc3339-validator package. Schemas that need more use "pattern".
_SYNTAX = {
    "date-time": DATE_TIME,
    "ipv4": re.compile(r"((25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])"),
    "date": re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
}
FORMATS = jsonschema.FormatChecker()
for _fmt, _rx in _SYNTAX.items():
    FORMATS.checks(_fmt)(lambda v, rx=_rx: not isinstance(v, str) or rx.fullmatch(v) is not None)


def chat(engine, answer_kind: str, what: str) -> str:
    return engine.apply_chat_template([
        {"role": "system", "content": f"You are a helpful assistant. Answer with {answer_kind} only."},
        {"role": "user", "content": f"Give me {what}."}])


def json_params(schemas: list[dict], temperature: float) -> list[dict]:
    # Half the schemas go in as dicts, half as JSON text: the engine takes both.
    return [{"json_schema": s if i % 2 else json.dumps(s), "max_new_tokens": JSON_MAX_NEW,
             "temperature": temperature, "seed": 1000 + i} for i, s in enumerate(schemas)]


def stopped(res: dict, max_new: int) -> bool:
    """True if the output ended on its own ("stop"); a cut one must say so ("length" at max_new)."""
    fr, n = res["meta_info"]["finish_reason"], res["meta_info"]["completion_tokens"]
    assert n == len(res["output_ids"]) <= max_new, (n, max_new)
    if fr["type"] == "length":
        assert n == max_new and fr == {"type": "length", "length": max_new}, fr
        return False
    assert fr["type"] == "stop", fr
    return True


def check_json(res: dict, schema: dict, max_new: int) -> None:
    if stopped(res, max_new):
        jsonschema.validate(json.loads(res["text"]), schema, format_checker=FORMATS)


def check_regex(res: dict, pattern: str, max_new: int) -> None:
    if stopped(res, max_new):
        assert re.fullmatch(pattern, res["text"]), (pattern, res["text"])


def stop_share(results: list[dict]) -> float:
    return sum(r["meta_info"]["finish_reason"]["type"] == "stop" for r in results) / len(results)


@pytest.fixture(scope="module")
def engine_no_jf(default_model_path):
    """A second engine with jump-forward off (same model and budgets as the session engine)."""
    from radixflow.runtime.engine import Engine

    eng = Engine(default_model_path, disable_jump_forward=True, max_total_tokens=8192,
                 max_running_requests=16, chunked_prefill_size=512, max_prefill_tokens=2048)
    yield eng
    eng.shutdown()


def test_suites_are_big_enough():
    assert len(SCHEMAS) >= 30 and len(REGEXES) >= 15
    assert len({n for n, _, _ in SCHEMAS}) == len(SCHEMAS) and len({n for n, _, _ in REGEXES}) == len(REGEXES)
    for _, _, schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_suite_validates(engine, temperature):
    prompts = [chat(engine, "JSON", what) for _, what, _ in SCHEMAS]
    schemas = [s for _, _, s in SCHEMAS]
    results = engine.generate(prompts, json_params(schemas, temperature))
    for (name, _, schema), res in zip(SCHEMAS, results):
        try:
            check_json(res, schema, JSON_MAX_NEW)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            raise AssertionError(f"{name}: {res['text']!r} {res['meta_info']['finish_reason']}") from e
    assert stop_share(results) >= MIN_STOP_SHARE, [r["meta_info"]["finish_reason"] for r in results]
    engine.check_invariant()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_suite_fullmatches(engine, temperature):
    prompts = [chat(engine, "the requested value", what) for _, what, _ in REGEXES]
    params = [{"regex": rx, "max_new_tokens": REGEX_MAX_NEW, "temperature": temperature, "seed": 2000 + i}
              for i, (_, _, rx) in enumerate(REGEXES)]
    results = engine.generate(prompts, params)
    for (name, _, rx), res in zip(REGEXES, results):
        try:
            check_regex(res, rx, REGEX_MAX_NEW)
        except AssertionError as e:
            raise AssertionError(f"{name}: {res['text']!r} {res['meta_info']['finish_reason']}") from e
    assert stop_share(results) >= MIN_STOP_SHARE, [r["meta_info"]["finish_reason"] for r in results]
    engine.check_invariant()


# Key-heavy schemas: most of each output is forced key text that jump-forward appends at once.
JF_SUBSET = ["person", "address", "weather_report", "tool_call", "classification", "book", "order_status",
             "api_response", "employee", "server_config", "medication", "vehicle", "sports_score"]
# Greedy outputs that are the same with jump-forward on and off (observed on the default model).
# The others differ for one reason: without jump-forward the model decodes the forced keys
# itself under the mask and greedy picks a tokenization it never saw in training, e.g.
# `{` `"` `s` `tr` `ee` `t` `"` `:` instead of the canonical `{"` `street` `":` that
# jump-forward's retokenization appends. Off that distribution the values change too
# ("street": "New York, New York" with jump-forward off vs "123 Main St" with it on).
JF_SAME = {"person", "tool_call", "classification", "book", "employee", "sports_score"}


def test_jump_forward_on_off(engine, engine_no_jf):
    subset = [(name, what, schema) for name, what, schema in SCHEMAS if name in JF_SUBSET]
    assert len(subset) == len(JF_SUBSET)
    prompts = [chat(engine, "JSON", what) for _, what, _ in subset]
    params = json_params([s for _, _, s in subset], 0.0)
    counts = {}
    outputs = {}
    for label, eng in (("on", engine), ("off", engine_no_jf)):
        before = eng.get_server_info()["generated_tokens"]
        outputs[label] = eng.generate(prompts, params)
        counts[label] = eng.get_server_info()["generated_tokens"] - before
        for (name, _, schema), res in zip(subset, outputs[label]):
            assert res["meta_info"]["finish_reason"]["type"] == "stop", (label, name, res["text"])
            check_json(res, schema, JSON_MAX_NEW)
    for (name, _, _), on, off in zip(subset, outputs["on"], outputs["off"]):
        if name in JF_SAME:
            assert json.loads(on["text"]) == json.loads(off["text"]), (name, on["text"], off["text"])
    # Forced text costs no sampling step: far fewer tokens are sampled with jump-forward on.
    assert counts["on"] < 0.7 * counts["off"], counts
    # With jump-forward the output is tokenized as the tokenizer would (the last id is EOS).
    for (name, _, _), on in zip(subset, outputs["on"]):
        assert engine.tokenizer.encode(on["text"], add_special_tokens=False) == on["output_ids"][:-1], name
    engine.check_invariant()
    engine_no_jf.check_invariant()


@pytest.mark.parametrize("spec", [
    {"regex": r"(x|y)abcdefghij klmnop"},
    {"json_schema": obj({"customer_full_name": {"type": "string", "maxLength": 12},
                         "shipping_address_line_1": {"type": "string", "maxLength": 12}})},
])
def test_jump_forward_respects_max_new_tokens(engine, spec):
    """Forced text is appended only where the token after it still fits max_new_tokens
    (regression: a jump landing exactly on the budget produced max_new_tokens + 1 tokens)."""
    prompt = chat(engine, "JSON", "a customer's full name and the first line of their shipping address")
    limits = list(range(1, 31))
    results = engine.generate([prompt] * len(limits),
                              [{**spec, "max_new_tokens": n, "temperature": 0} for n in limits])
    for n, res in zip(limits, results):
        if "regex" in spec:
            check_regex(res, spec["regex"], n)
        else:
            check_json(res, spec["json_schema"], n)
    assert results[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_mixed_batch_matches_each_alone(engine):
    prompts = [
        chat(engine, "JSON", "a person with a name, an age and an email address"),
        chat(engine, "plain text", "a haiku about the sea"),
        chat(engine, "the requested value", "the IPv4 address of a home router"),
        chat(engine, "plain text", "three tips for learning Python"),
        chat(engine, "JSON", "the sentiment classification of 'I love this phone'"),
        chat(engine, "plain text", "a one-line joke"),
        chat(engine, "JSON", "a weather report for Paris"),
    ]
    spec = {name: schema for name, _, schema in SCHEMAS}
    ipv4 = {name: rx for name, _, rx in REGEXES}["ipv4"]
    greedy = {"temperature": 0, "max_new_tokens": 32}
    params = [
        {**greedy, "json_schema": spec["person"], "max_new_tokens": 48},
        greedy,
        {**greedy, "regex": ipv4},
        {**greedy, "max_new_tokens": 40},
        {**greedy, "json_schema": spec["classification"]},
        {**greedy, "ignore_eos": True, "max_new_tokens": 24},
        # A seeded sampled request: its own generator makes it batch-independent too.
        {"json_schema": spec["weather_report"], "temperature": 1.0, "seed": 7, "max_new_tokens": 64},
    ]
    batched = engine.generate(prompts, params)
    alone = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    for i, (b, a) in enumerate(zip(batched, alone)):
        assert b["text"] == a["text"] and b["output_ids"] == a["output_ids"], (i, b["text"], a["text"])
        assert b["meta_info"]["finish_reason"] == a["meta_info"]["finish_reason"], i
    check_json(batched[0], spec["person"], 48)
    check_regex(batched[2], ipv4, 32)
    check_json(batched[6], spec["weather_report"], 64)
    assert batched[5]["meta_info"]["completion_tokens"] == 24


@pytest.mark.parametrize(("params", "message"), [
    ({"json_schema": "{bad json"}, "json_schema is not valid JSON"),
    ({"json_schema": {"type": "wat"}}, 'Unsupported type "wat"'),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "$defs"),
    ({"json_schema": {"type": "string", "pattern": "(?=a)b"}}, "Lookahead is not supported"),
    ({"regex": r"(a)\1"}, "Backreference is not supported"),
    ({"regex": r"(?<=a)b"}, "Lookbehind is not supported"),
    ({"regex": "(ab"}, "parenthesis is not closed"),
    ({"regex": "a{3,1}"}, "Lower bound is larger than upper bound"),
    ({"ebnf": "root ::= undefined_rule"}, 'Rule "undefined_rule" is not defined'),
    ({"regex": "a", "json_schema": "{}"}, "at most one of json_schema, regex"),
])
def test_invalid_specs_are_refused_with_reason(engine, params, message):
    prompt = chat(engine, "JSON", "a person")
    good = {"json_schema": SCHEMAS[0][2], "max_new_tokens": 48, "temperature": 0}
    with pytest.raises((GenerationError, ValueError), match=re.escape(message)):
        engine.generate(prompt, {**params, "max_new_tokens": 8})
    # A bad spec in a batch fails that call, not the engine: the next request is served.
    with pytest.raises((GenerationError, ValueError), match=re.escape(message)):
        engine.generate([prompt, prompt], [{**good, "max_new_tokens": 8}, {**params, "max_new_tokens": 8}])
    res = engine.generate(prompt, good)
    check_json(res, SCHEMAS[0][2], 48)
    assert res["meta_info"]["finish_reason"]["type"] == "stop"
    engine.check_invariant()
