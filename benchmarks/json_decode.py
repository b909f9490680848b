"""JSON extraction with key-heavy schemas: the cost of the grammar and the gain of jump-forward.

Workload: 8 extraction tasks, each a chat prompt with a short text and a JSON schema of 11
required keys with long names ("customer_full_name", "shipping_address_line_1", ...) and short
values (enums, bounded integers, booleans, short strings). Greedy. Three modes, same run:

- none:   the same prompts unconstrained, ignore_eos, each with max_new_tokens = its output
          length in the `jf-off` run (so the mean output length, and at batch 8 the batch size
          of every step, are those of `jf-off`: the same tokens decoded without a grammar);
- jf-off: constrained, every output token sampled after a decode step;
- jf-on:  constrained with jump-forward (forced text appended, then re-prefilled).

each at batch 1 (requests one after another) and batch 8 (all submitted at once). Token counts
come from the engine's counters: `generated_tokens` are sampled from a forward pass,
`jump_forward_tokens` were appended without one. The grammar's share of the step time is
measured by timing hooks around the grammar calls of the scheduler.

    python benchmarks/json_decode.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict

SHORT = {"type": "string", "maxLength": 24}


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def _obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


BOOL = {"type": "boolean"}
TASKS: list[tuple[str, str, dict]] = [
    ("shipping order",
     "Order from Maria Lopez (maria.lopez@mail.com): 3 items, $149 total, paid by credit card. Ship to 42 Oak "
     "Street, Austin, 73301, US, express delivery, please gift wrap it.",
     _obj({"customer_full_name": SHORT, "customer_email_address": SHORT, "shipping_address_line_1": SHORT,
           "shipping_city_name": SHORT, "shipping_postal_code": {"type": "string", "pattern": "[0-9]{5}"},
           "shipping_country_code": _enum("US", "CA", "GB", "DE"), "order_total_amount_usd": _int(0, 100000),
           "number_of_items_ordered": _int(1, 99), "is_gift_wrapping_requested": BOOL,
           "preferred_delivery_speed": _enum("standard", "express", "overnight"),
           "payment_method_used": _enum("credit_card", "paypal", "bank_transfer")})),
    ("patient intake",
     "Tom Baker, 58, has had a dry cough for 4 days and a fever. He takes lisinopril, is allergic to penicillin, "
     "is insured by Aetna and would like to come in on Tuesday. Not urgent.",
     _obj({"patient_full_name": SHORT, "patient_age_in_years": _int(0, 120), "primary_symptom_description": SHORT,
           "symptom_duration_in_days": _int(0, 365), "has_fever_been_reported": BOOL,
           "current_medication_name": SHORT, "known_drug_allergy_name": SHORT, "insurance_provider_name": SHORT,
           "preferred_appointment_weekday": _enum("monday", "tuesday", "wednesday", "thursday", "friday"),
           "triage_priority_level": _enum("low", "medium", "high"), "requires_interpreter_service": BOOL})),
    ("job application",
     "Priya Shah (priya@shah.dev) applies for Senior Backend Engineer. She has 7 years of experience, a master's "
     "degree, works at Stripe, expects $180000, can relocate and can start in March. She mostly writes Go.",
     _obj({"applicant_full_name": SHORT, "applicant_email_address": SHORT, "position_applied_for": SHORT,
           "years_of_professional_experience": _int(0, 60),
           "highest_education_level": _enum("high_school", "bachelor", "master", "phd"),
           "current_employer_name": SHORT, "expected_annual_salary_usd": _int(0, 1000000),
           "willing_to_relocate": BOOL, "earliest_start_month": _enum("january", "february", "march", "april"),
           "primary_programming_language": _enum("python", "go", "java", "rust"),
           "referred_by_current_employee": BOOL})),
    ("support ticket",
     "Account AC-7781 reports that the Photo Editor app v2.4.1 crashes on Windows every time they export. They "
     "tried 5 times, are quite angry and want a phone call back today.",
     _obj({"customer_account_identifier": SHORT, "product_name_mentioned": SHORT,
           "issue_category_label": _enum("crash", "billing", "login", "performance"),
           "issue_severity_level": _enum("low", "medium", "high", "critical"),
           "operating_system_name": _enum("windows", "macos", "linux", "android"),
           "application_version_number": {"type": "string", "pattern": "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}"},
           "number_of_failed_attempts": _int(0, 100),
           "customer_sentiment_label": _enum("positive", "neutral", "negative"),
           "requires_phone_callback": BOOL, "preferred_contact_channel": _enum("phone", "email", "chat"),
           "is_known_issue_reference": BOOL})),
    ("hotel booking",
     "Book Anna Weber into the Grand Hotel in Vienna from the 12th for 3 nights: 2 adults and 1 child, a double "
     "room with breakfast, 540 euros in total. She is a loyalty member and asks for a quiet room.",
     _obj({"guest_full_name": SHORT, "hotel_name_requested": SHORT, "hotel_city_name": SHORT,
           "check_in_day_of_month": _int(1, 31), "number_of_nights_booked": _int(1, 60),
           "number_of_adult_guests": _int(1, 10), "number_of_child_guests": _int(0, 10),
           "room_type_requested": _enum("single", "double", "suite"), "breakfast_is_included": BOOL,
           "total_price_in_euros": _int(0, 100000), "special_request_note": SHORT})),
    ("insurance claim",
     "Policy holder James Carter reports that his 2019 Honda Civic was hit in Denver on the 3rd. Damage is about "
     "$4200, a police report was filed, two vehicles were involved, nobody was hurt; the other driver was at fault.",
     _obj({"policy_holder_full_name": SHORT, "vehicle_make_and_model": SHORT, "vehicle_model_year": _int(1950, 2026),
           "accident_city_name": SHORT, "accident_day_of_month": _int(1, 31),
           "estimated_damage_cost_usd": _int(0, 1000000), "police_report_was_filed": BOOL,
           "number_of_vehicles_involved": _int(1, 20), "injuries_were_reported": BOOL,
           "claim_type_category": _enum("collision", "theft", "weather", "vandalism"),
           "party_at_fault": _enum("policy_holder", "other_driver", "unknown")})),
    ("real estate listing",
     "For sale: a 3-bedroom, 2-bathroom house at 17 Elm Road, Portland, built in 1998, 1850 square feet, with a "
     "garage and no pool, asking $625000. Contact agent Lisa Chen.",
     _obj({"property_street_address": SHORT, "property_city_name": SHORT, "listing_price_usd": _int(0, 100000000),
           "number_of_bedrooms": _int(0, 20), "number_of_bathrooms": _int(0, 20),
           "living_area_square_feet": _int(100, 100000), "year_property_was_built": _int(1800, 2026),
           "property_type_category": _enum("house", "apartment", "condo", "townhouse"),
           "has_garage_parking": BOOL, "has_swimming_pool": BOOL, "listing_agent_full_name": SHORT})),
    ("flight booking",
     "Passenger Omar Haddad flies from Boston (BOS) to Lisbon (LIS) on June 21st in business class with 2 checked "
     "bags, wants a window seat and a vegetarian meal. Ticket $2300; he is a frequent flyer.",
     _obj({"passenger_full_name": SHORT, "departure_airport_code": {"type": "string", "pattern": "[A-Z]{3}"},
           "arrival_airport_code": {"type": "string", "pattern": "[A-Z]{3}"},
           "departure_day_of_month": _int(1, 31),
           "departure_month_name": _enum("april", "may", "june", "july"),
           "cabin_class_booked": _enum("economy", "premium", "business", "first"),
           "number_of_checked_bags": _int(0, 5), "seat_preference_type": _enum("window", "aisle", "middle"),
           "meal_preference_type": _enum("regular", "vegetarian", "vegan"),
           "is_frequent_flyer_member": BOOL, "ticket_price_usd": _int(0, 100000)})),
]


class Probe:
    """Wall time spent in the scheduler's grammar calls (timing wrappers; benchmark only)."""

    def __init__(self) -> None:
        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.time[name] += time.perf_counter() - t
                self.calls[name] += 1
        return timed

    def install(self) -> None:
        from radixflow.grammars.xgrammar_backend import XGrammarBackend, XGrammarMatcher
        from radixflow.runtime.model.model_runner import ModelRunner
        from radixflow.runtime.scheduler.grammar_manager import GrammarManager

        mask_fn = GrammarManager.mask_fn

        def timed_mask_fn(gm, reqs):
            apply = mask_fn(gm, reqs)
            return None if apply is None else self.wrap("mask", apply)
        GrammarManager.mask_fn = timed_mask_fn
        GrammarManager.accept = self.wrap("accept", GrammarManager.accept)
        GrammarManager.jump_forward = self.wrap("jump_forward", GrammarManager.jump_forward)
        XGrammarMatcher.fill_bitmask = self.wrap("fill_row", XGrammarMatcher.fill_bitmask)
        XGrammarBackend.apply_bitmask = staticmethod(self.wrap("apply", XGrammarBackend.apply_bitmask))
        ModelRunner.forward = self.wrap("forward", ModelRunner.forward)

    def reset(self) -> None:
        self.time.clear()
        self.calls.clear()


def prompts(eng) -> list[str]:
    system = "Extract the requested fields from the user's text. Answer with one JSON object."
    return [eng.apply_chat_template([{"role": "system", "content": system},
                                     {"role": "user", "content": f"{kind}: {text}"}]) for kind, text, _ in TASKS]


def run(eng, probe: Probe, texts: list[str], params: list[dict], batch: int) -> dict:
    """One measured pass over all prompts, cold prefix cache; returns counters and timings."""
    eng.flush_cache()
    gm = eng.scheduler.grammar
    jf0 = gm.jump_forward_tokens if gm is not None else 0
    info0 = eng.get_server_info()
    probe.reset()
    t = time.perf_counter()
    if batch == 1:
        results = [eng.generate(p, sp) for p, sp in zip(texts, params)]
    else:
        results = eng.generate(texts, params)
    wall = time.perf_counter() - t
    info = eng.get_server_info()
    gm = eng.scheduler.grammar
    out = {k: info[k] - info0[k] for k in ("decode_steps", "extend_steps", "generated_tokens")}
    out.update(wall=wall, results=results, probe=(dict(probe.time), dict(probe.calls)),
               forced=(gm.jump_forward_tokens if gm is not None else 0) - jf0,
               latency=statistics.mean(r["meta_info"]["e2e_latency"] for r in results),
               out_tokens=sum(r["meta_info"]["completion_tokens"] for r in results))
    for r, (_, _, schema) in zip(results, TASKS):
        if "json_schema" in params[0]:
            assert r["meta_info"]["finish_reason"]["type"] == "stop", r
            _validate(json.loads(r["text"]), schema)
    return out


def _validate(value: dict, schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:
        assert set(value) == set(schema["required"]), value
        return
    jsonschema.validate(value, schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="measured passes per cell, interleaved (fastest kept)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()

    import torch

    from radixflow.runtime.engine import Engine
    from radixflow.runtime.loading.default_model import resolve_model_path

    probe = Probe()
    probe.install()
    path = resolve_model_path(None)
    opts = dict(max_running_requests=8, max_total_tokens=16384)
    engines = {"jf-on": Engine(path, **opts), "jf-off": Engine(path, disable_jump_forward=True, **opts)}
    texts = prompts(engines["jf-on"])
    constrained = [{"json_schema": schema, "temperature": 0, "max_new_tokens": args.max_new_tokens}
                   for _, _, schema in TASKS]
    # Warm-up: compiles the grammars and gives each greedy jf-off output length.
    warm = {mode: eng.generate(texts, constrained) for mode, eng in engines.items()}
    lengths = [r["meta_info"]["completion_tokens"] for r in warm["jf-off"]]
    params = {"jf-off": constrained, "jf-on": constrained,
              "none": [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lengths]}
    print(f"workload: {len(TASKS)} extraction prompts, 11 required keys each, greedy; unconstrained run: "
          f"{lengths} tokens (jf-off output lengths, mean {statistics.mean(lengths):.1f}); "
          f"torch threads {torch.get_num_threads()}")

    passes: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for _ in range(args.repeat):
        for batch in (1, 8):
            for mode in ("jf-off", "none", "jf-on"):
                eng = engines["jf-off" if mode == "none" else mode]
                passes[(mode, batch)].append(run(eng, probe, texts, params[mode], batch))
    cells = {key: min(ps, key=lambda c: c["wall"]) for key, ps in passes.items()}

    print()
    print("| batch | mode | out tok/req | sampled tok | forced tok | decode / extend steps | wall s | out tok/s | "
          "sampled tok/s | ms / sampled tok | mean e2e latency s | grammar ms/step | forward ms/step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (mode, batch), c in cells.items():
        steps = c["decode_steps"] + c["extend_steps"]
        t, _ = c["probe"]
        print(f"| {batch} | {mode} | {c['out_tokens'] / len(TASKS):.1f} | {c['generated_tokens']} | {c['forced']} | "
              f"{c['decode_steps']} / {c['extend_steps']} | {c['wall']:.2f} | {c['out_tokens'] / c['wall']:.1f} | "
              f"{c['generated_tokens'] / c['wall']:.1f} | {1000 * c['wall'] / c['generated_tokens']:.1f} | "
              f"{c['latency']:.2f} | {1000 * _grammar_time(t) / steps:.2f} | "
              f"{1000 * t.get('forward', 0) / steps:.1f} |")

    print()
    for batch in (1, 8):
        none, off, on = cells[("none", batch)], cells[("jf-off", batch)], cells[("jf-on", batch)]
        wall_overhead = (off["wall"] / off["generated_tokens"]) / (none["wall"] / none["generated_tokens"]) - 1
        t, _ = off["probe"]
        probe_overhead = _grammar_time(t) / (off["wall"] - _grammar_time(t))
        print(f"batch {batch}: constraint overhead per decoded token, jf-off vs none: {100 * wall_overhead:+.1f}% "
              f"by wall time, {100 * probe_overhead:.1f}% by timed grammar calls (target <= 10%)")
        print(f"  jump-forward speedup (jf-off / jf-on): mean e2e latency {off['latency'] / on['latency']:.2f}x, "
              f"wall {off['wall'] / on['wall']:.2f}x (target >= 1.5x)")
        print(f"  jf-off grammar calls: bitmask fill {_per_call(off, 'fill_row', 1e6):.0f} us/row, apply kernel "
              f"{_per_call(off, 'apply', 1e6):.0f} us/step, whole mask hook {_per_call(off, 'mask', 1e3):.2f} "
              f"ms/step, accept {_per_call(off, 'accept', 1e6):.0f} us/token; jf-on jump-forward check "
              f"{_per_call(on, 'jump_forward', 1e6):.0f} us/step")
    for eng in engines.values():
        eng.shutdown()


def _per_call(cell: dict, name: str, scale: float) -> float:
    t, n = cell["probe"]
    return scale * t.get(name, 0) / max(1, n.get(name, 0))


def _grammar_time(t: dict[str, float]) -> float:
    return t.get("mask", 0) + t.get("accept", 0) + t.get("jump_forward", 0)


if __name__ == "__main__":
    main()
