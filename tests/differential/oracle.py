#!/usr/bin/env python3
"""Differential scenario for Vigie, decided by the reference Cedar engine.

Generates, from a fixed seed, a policy directory (the example schema and
policies with a large generated entity set) and a list of requests covering
every policy, both decisions, extension values (ip, decimal, datetime) given
as plain strings and as `__extn` escapes, nested groups and request-scoped
entities. Each request is decided by cedarpy (the official Cedar engine's
Python binding); the expected decision and determining policy ids are written
beside it.

    python3 oracle.py POLICIES_DIR OUT_DIR [--seed N] [--requests N]

writes OUT_DIR/policies/ (a complete policy directory) and OUT_DIR/cases.json.
The Rust test `differential` sends every case through Vigie's endpoints and
compares. Exits non-zero if the scenario does not cover every policy with
both an Allow and a Deny somewhere.
"""

import argparse
import glob
import json
import os
import random
import shutil
import sys

import cedarpy

NS = "Agency"


def uid(t, i):
    return {"type": f"{NS}::{t}", "id": i}


def uid_str(t, i):
    return f'{NS}::{t}::"{i}"'


def generate_entities(rng):
    ents = []

    def ent(t, i, attrs=None, parents=()):
        ents.append({"uid": uid(t, i), "attrs": attrs or {}, "parents": list(parents)})

    directorates = [f"dg-{k}" for k in range(4)]
    for d in directorates:
        ent("Directorate", d)
    # The example's departments (the template link names `social`) plus more.
    departments = ["social", "health", "finance", "it"] + [f"dept-{k}" for k in range(12)]
    for k, d in enumerate(departments):
        ent("Department", d, {"label": f"Department {d}"}, [uid("Directorate", directorates[k % 4])])
    ent("Role", "staff")
    ent("Role", "contractor")
    for r in ["supervisor", "administrator", "dpo"]:
        ent("Role", r, {}, [uid("Role", "staff")])
    # Nested groups: team roles inside staff/contractor, two levels deep.
    ent("Role", "team-a", {}, [uid("Role", "staff")])
    ent("Role", "team-a1", {}, [uid("Role", "team-a")])
    ent("Role", "vendors", {}, [uid("Role", "contractor")])
    roles = ["staff", "contractor", "supervisor", "administrator", "dpo", "team-a1", "vendors"]

    users = ["mathis"] + [f"user-{k:03d}" for k in range(220)]
    by_role = {}
    for i, u in enumerate(users):
        role = "contractor" if u == "mathis" else rng.choice(roles)
        by_role.setdefault(role, []).append(u)
        dept = rng.choice(departments)
        clearance = rng.randint(0, 3)
        if clearance == 3 and role not in ("contractor", "vendors"):
            by_role.setdefault(("cleared", dept), []).append(u)
        attrs = {
            "department": uid("Department", dept),
            "clearance": clearance,
            "suspended": rng.random() < 0.06,
            "supervises": [uid("Department", d) for d in rng.sample(departments, rng.randint(0, 3))],
        }
        if role in ("contractor", "vendors"):
            attrs["employer"] = rng.choice(["Numerique Conseil", "Audit Public SA"])
        ent("User", u, attrs, [uid("Role", role), uid("Department", dept)])

    records = [f"rec-{k:03d}" for k in range(300)]
    by_dept = {}
    for r in records:
        dept = rng.choice(departments)
        by_dept.setdefault(dept, []).append(r)
        sensitivity = rng.randint(0, 3)
        if sensitivity == 3:
            by_dept.setdefault(("secret", dept), []).append(r)
        attrs = {
            "department": uid("Department", dept),
            "sensitivity": sensitivity,
            "legal_hold": rng.random() < 0.15,
        }
        if rng.random() < 0.3:
            year = rng.choice([2024, 2025, 2026, 2027])
            attrs["retention_until"] = {"__extn": {"fn": "datetime", "arg": f"{year}-06-01T00:00:00Z"}}
        ent("Record", r, attrs, [uid("Department", dept)])
    systems = ["payroll", "registry", "mail"]
    for s in systems:
        ent("System", s, {"criticality": rng.randint(1, 3)})
    ent("AuditLog", "decisions")
    return ents, users, records, systems, departments, by_role, by_dept


def random_context(rng):
    ctx = {}
    if rng.random() < 0.45:
        ip = rng.choice([
            "10.1.2.3", "192.0.2.10", "203.0.113.7", "203.0.113.200",
            "2001:db8:bad::1", "2001:db8:cafe::1", "::1",
        ])
        ctx["ip"] = ip if rng.random() < 0.5 else {"__extn": {"fn": "ip", "arg": ip}}
    if rng.random() < 0.4:
        now = rng.choice(["2024-01-15T09:00:00Z", "2025-09-01T12:30:00Z", "2026-11-28T08:00:00Z", "2028-01-01T00:00:00Z"])
        ctx["now"] = now if rng.random() < 0.5 else {"__extn": {"fn": "datetime", "arg": now}}
    if rng.random() < 0.35:
        risk = rng.choice(["0.05", "0.5", "0.8", "0.81", "0.99"])
        ctx["risk"] = risk if rng.random() < 0.5 else {"__extn": {"fn": "decimal", "arg": risk}}
    if rng.random() < 0.75:
        hardware = rng.random() < 0.4
        ctx["mfa"] = {
            "present": rng.random() < 0.85,
            "methods": ["pwd", "hwk"] if hardware else rng.choice([["pwd"], ["pwd", "otp"]]),
            "age_seconds": rng.choice([10, 120, 299, 301, 900, 901, 7200]),
            "hardware": hardware,
        }
    if rng.random() < 0.7:
        zone, country, eu = rng.choice([
            ("on-premises", "FR", True), ("secnumcloud", "FR", True), ("vpn", "DE", True),
            ("internet", "US", False), ("internet", "FR", True),
        ])
        ctx["network"] = {"zone": zone, "country": country, "eu": eu}
    if rng.random() < 0.6:
        ctx["hours"] = {"open": rng.random() < 0.7}
    return ctx


def generate_requests(rng, n, users, records, systems, departments, by_role, by_dept):
    cases = []
    for k in range(n):
        p = rng.random()
        user = rng.choice(users)
        if p < 0.77:
            action = rng.choice(["read", "read", "update", "export"])
            resource = uid("Record", rng.choice(records))
        elif p < 0.80:
            # The delegated contractor on the delegated department.
            user, action = "mathis", "read"
            resource = uid("Record", rng.choice(by_dept["social"]))
        elif p < 0.83:
            # A cleared agent on a secret record of their department.
            depts = [d for d in departments if by_role.get(("cleared", d)) and by_dept.get(("secret", d))]
            d = rng.choice(depts)
            user, action = rng.choice(by_role[("cleared", d)]), "read"
            resource = uid("Record", rng.choice(by_dept[("secret", d)]))
        elif p < 0.92:
            action, resource = "administer", uid("System", rng.choice(systems))
            if rng.random() < 0.5:
                user = rng.choice(by_role["administrator"])
        else:
            action, resource = "read_audit", uid("AuditLog", "decisions")
        req = {
            # Both uid forms callers use.
            "principal": uid("User", user) if k % 2 else uid_str("User", user),
            "action": uid_str("Action", action) if k % 3 else uid("Action", action),
            "resource": resource if k % 5 else uid_str(resource["type"].split("::")[1], resource["id"]),
            "context": random_context(rng),
        }
        # Some requests bring their own principal entity (a user unknown to
        # the store), merged over the stored ones.
        if rng.random() < 0.05:
            newcomer = f"visitor-{k}"
            role = rng.choice(["staff", "contractor", "dpo", "team-a1"])
            dept = rng.choice(departments)
            req["principal"] = uid("User", newcomer)
            req["entities"] = [{
                "uid": uid("User", newcomer),
                "attrs": {
                    "department": uid("Department", dept),
                    "clearance": rng.randint(0, 3),
                    "suspended": False,
                    "supervises": [],
                },
                "parents": [uid("Role", role), uid("Department", dept)],
            }]
        cases.append(req)
    return cases


def to_cedarpy(v):
    """cedarpy takes uids as strings or {type,id} dicts, like Vigie."""
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policies")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=20261128)
    ap.add_argument("--requests", type=int, default=1200)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    out_pol = os.path.join(args.out, "policies")
    os.makedirs(out_pol, exist_ok=True)
    cedar_files = sorted(glob.glob(os.path.join(args.policies, "**", "*.cedar"), recursive=True))
    for f in cedar_files + [os.path.join(args.policies, "schema.cedarschema"), os.path.join(args.policies, "links.json")]:
        dest = os.path.join(out_pol, os.path.relpath(f, args.policies))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(f, dest)

    entities, users, records, systems, departments, by_role, by_dept = generate_entities(rng)
    with open(os.path.join(out_pol, "entities.json"), "w") as fh:
        json.dump(entities, fh, indent=1)

    schema = open(os.path.join(args.policies, "schema.cedarschema")).read()
    text = "\n".join(open(f).read() for f in cedar_files)
    pset = cedarpy.PolicySet.from_str(text)
    links = json.load(open(os.path.join(args.policies, "links.json")))
    for link in links:
        pset = pset.with_linked(link["template_id"], link["link_id"], link["args"])
    stored = cedarpy.Entities.from_json_str(json.dumps(entities), schema)

    requests = generate_requests(rng, args.requests, users, records, systems, departments, by_role, by_dept)
    cases = []
    seen = {}
    for req in requests:
        ents = stored
        if "entities" in req:
            ents = entities + req["entities"]
        r = cedarpy.is_authorized(
            {k: req[k] for k in ("principal", "action", "resource", "context")}, pset, ents, schema
        )
        if r.diagnostics.errors:
            print(f"cedarpy reported errors for {req}: {r.diagnostics.errors}", file=sys.stderr)
            sys.exit(2)
        # Policies are named by their @id; a template link by its own id
        # (it inherits the template's annotations, not its name).
        names = r.diagnostics.id_annotations_by_reason
        link_ids = {link["link_id"] for link in links}
        reasons = sorted(p if p in link_ids else names.get(p, p) for p in r.diagnostics.reasons)
        decision = "Allow" if r.allowed else "Deny"
        for p in reasons:
            seen.setdefault(p, set()).add(decision)
        cases.append({"request": req, "decision": decision, "reasons": reasons})

    # Every policy must be determining somewhere, and both decisions must occur.
    all_ids = set()
    for f in cedar_files:
        for line in open(f):
            line = line.strip()
            if line.startswith('@id("'):
                all_ids.add(line[5:line.index('")')])
    all_ids.discard("delegated-read")  # the template itself; its link is what decides
    all_ids |= {link["link_id"] for link in links}
    missing = sorted(all_ids - set(seen))
    decisions = {c["decision"] for c in cases}
    if missing or decisions != {"Allow", "Deny"}:
        print(f"scenario does not cover: {missing}, decisions seen: {decisions}", file=sys.stderr)
        sys.exit(3)

    with open(os.path.join(args.out, "cases.json"), "w") as fh:
        json.dump(cases, fh)
    allow = sum(1 for c in cases if c["decision"] == "Allow")
    print(f"{len(cases)} cases ({allow} Allow, {len(cases) - allow} Deny), {len(entities)} entities, "
          f"{len(all_ids)} policies covered")


if __name__ == "__main__":
    main()
