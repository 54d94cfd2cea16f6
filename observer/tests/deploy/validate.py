"""Strict schema validation of rendered Kubernetes manifests, for observer's deploy test.

    validate.py --kubernetes 1.28,1.32,1.37 LABEL=FILE...

Each FILE is the output of `kubectl kustomize` (several YAML documents); LABEL names it in
messages (the kustomization directory). Built-in kinds are validated with kubernetes-validate's
strict schemas (unknown fields rejected) for every Kubernetes version given; the Prometheus
Operator's kinds (monitoring.coreos.com/v1) with the pydantic models of
cloudcoil-models-prometheus-operator, made strict here: a field the model does not know, or a
value it had to convert, is an error. Any other kind is an error too: nothing is skipped.

Prints one line per problem, naming the file, the object and the field path, and exits 1 if
there was any; otherwise prints what was validated and exits 0.
"""
import argparse
import sys

import yaml
import kubernetes_validate
import pydantic
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

OPERATOR_KINDS = {
    "ServiceMonitor": monitoring_v1.ServiceMonitor,
    "PodMonitor": monitoring_v1.PodMonitor,
    "PrometheusRule": monitoring_v1.PrometheusRule,
}


def path_str(path):
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path) or "."


def differences(given, kept, path=()):
    """Where the model's round trip lost or changed what the manifest said."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield path + (key,), "unknown field (the CRD schema has no such property)"
            else:
                yield from differences(value, kept[key], path + (key,))
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from differences(a, b, path + (i,))
    elif given != kept or type(given) is not type(kept):
        yield path, f"value {given!r} is not what the schema keeps ({kept!r})"


def validate_operator(doc):
    model = OPERATOR_KINDS.get(doc.get("kind"))
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or model is None:
        return [(".", f"no schema for {doc.get('apiVersion')} {doc.get('kind')}")]
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as e:
        return [(path_str(err["loc"]), err["msg"]) for err in e.errors()]
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [(path_str(p), msg) for p, msg in differences(doc, kept)]


def validate_builtin(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [(path_str(tuple(e.absolute_path)), e.message)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [(".", e.message)]
    return []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes", required=True, help="comma-separated Kubernetes versions")
    parser.add_argument("files", nargs="+", metavar="LABEL=FILE")
    args = parser.parse_args()
    versions = args.kubernetes.split(",")
    problems = []
    checked = 0
    for item in args.files:
        label, _, filename = item.partition("=")
        with open(filename) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            problems.append(f"{label}: rendered no objects")
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                checks = [("prometheus-operator v0.80.1 CRD", validate_operator(doc))]
            else:
                checks = [(f"Kubernetes {v} (strict)", validate_builtin(doc, v)) for v in versions]
            for schema, errors in checks:
                checked += 1
                for where, msg in errors:
                    problems.append(f"{label}: {name}: {schema}: at {where}: {msg}")
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"validated {checked} object/schema pairs from {len(args.files)} renderings "
          f"(Kubernetes {', '.join(versions)}; kubernetes-validate {kubernetes_validate.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
