#!/usr/bin/env python3
"""Validates the deployment files against published schemas.

- compose.yaml against the Compose specification's JSON schema, as shipped
  in the `docker-compose` package on PyPI (compose/config/compose_spec.json);
- deploy/kubernetes/*.yaml against the Kubernetes schemas of the
  `kubernetes-validate` package, in strict mode (unknown fields refused).

    python3 validate.py REPO_ROOT     # prints one line per file; exit 1 on any error
"""

import importlib.util
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES = "1.34.0"


def compose_schema():
    spec = importlib.util.find_spec("compose")
    path = os.path.join(list(spec.submodule_search_locations)[0], "config", "compose_spec.json")
    with open(path) as f:
        return json.load(f)


def main():
    root = sys.argv[1]
    failures = 0
    with open(os.path.join(root, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    validator = jsonschema.Draft7Validator(compose_schema())
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    for e in errors:
        print(f"compose.yaml: {'/'.join(map(str, e.path))}: {e.message}")
    failures += len(errors)
    print(f"compose.yaml: {len(compose['services'])} services, {len(errors)} errors against the Compose spec schema")

    kdir = os.path.join(root, "deploy", "kubernetes")
    for name in sorted(os.listdir(kdir)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(kdir, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for d in docs:
            try:
                kubernetes_validate.validate(d, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures += 1
                print(f"deploy/kubernetes/{name}: {d['kind']} {d['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
        print(f"deploy/kubernetes/{name}: {len(docs)} objects ({', '.join(d['kind'] for d in docs)}) checked against Kubernetes {KUBERNETES} (strict)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
