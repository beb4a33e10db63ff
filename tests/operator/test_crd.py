"""The CRD: generated from api.py, structural, valid, documented, and its CEL rules agree with pydantic."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator import api, crd
from tests.helm import KUBE_VERSIONS

CRD = crd.render()
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
VALID = {"model": {"nameOrPath": "Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": {"path": "data/train.jsonl"}}


def test_committed_crd_files_are_fresh():
    assert crd.main(["--check"]) == 0, "run: python -m kubetune_operator.crd"
    main, chart = crd.TARGETS
    assert main.read_bytes() == chart.read_bytes()
    assert yaml.safe_load(main.read_text()) == CRD


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_is_a_valid_kubernetes_object(version):
    kubernetes_validate.validate(CRD, version, strict=True)


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """The rules the API server enforces on CRD schemas (apiextensions 'structural schema')."""
    root = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert "$ref" not in node, path
        special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or special, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        if node.get("nullable"):
            assert "default" not in node or node["default"] is not None, path


def test_every_spec_field_is_documented():
    undocumented = [p for p, n in walk(SPEC_SCHEMA) if p and not p.endswith(("[]", "{}")) and not n.get("description")]
    assert undocumented == []


def test_defaults_are_there_for_the_api_server_to_apply():
    props = SPEC_SCHEMA["properties"]
    assert props["lora"]["default"] == {}
    assert props["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    assert props["training"]["properties"]["learningRate"]["default"] == 2e-4
    assert props["maxRestarts"]["default"] == 3
    assert props["resources"]["properties"]["gpu"]["default"] == 1


def test_printer_columns_and_names():
    version = CRD["spec"]["versions"][0]
    assert [col["name"] for col in version["additionalPrinterColumns"] if not col.get("priority")] == [
        "Phase",
        "Progress",
        "Step",
        "Loss",
        "Eval",
        "ETA",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    assert CRD["spec"]["names"]["shortNames"] == ["tr"]
    assert CRD["spec"]["names"]["categories"] == ["kubetune"]


# --------------------------------------------------------------------------- CEL


def as_stored(obj: Any, schema: dict[str, Any]) -> Any:
    """Values typed by the schema, as the API server gives them to CEL: a `number` field is a double even
    when the YAML says 0."""
    if schema.get("type") == "number" and isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        return {k: as_stored(v, props.get(k, {})) for k, v in obj.items()}
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [as_stored(v, schema["items"]) for v in obj]
    return obj


def rules_at(obj: Any, schema: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, str, Any]]:
    """(path, rule, self) for every x-kubernetes-validations rule that applies inside obj."""
    obj = as_stored(obj, schema)
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], obj
    if isinstance(obj, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in obj:
                yield from rules_at(obj[name], child, f"{path}.{name}")
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from rules_at(item, schema["items"], f"{path}[{i}]")


ENV = celpy.Environment()


def cel(rule: str, self_: Any, old: Any = None) -> bool:
    activation = {"self": celpy.json_to_cel(self_)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return bool(ENV.program(ENV.compile(rule)).evaluate(activation))


def defaulted(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the API server stores it: defaults filled, unset optional fields absent."""
    return api.TrainingRunSpec.model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)


def test_every_rule_compiles():
    for path, rule, _ in rules_at(defaulted(VALID), SPEC_SCHEMA):
        ENV.compile(rule)  # raises on a syntax error
        assert path


def with_(patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(VALID)
    for key, value in patch.items():
        node = merged
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merged


# Each case breaks (or keeps) one cross-field rule: the CEL the API server runs and the pydantic validator
# the trainer and the operator run must agree on it.
AGREEMENT = [
    ({}, True),
    ({"dataset.validationSplit": 0.5, "dataset.testSplit": 0.5}, False),
    ({"dataset.validationSplit": 0.5, "dataset.testSplit": 0.5, "dataset.testPath": "t.jsonl"}, True),
    ({"dataset.validationSplit": 0.6, "dataset.testSplit": 0.3}, True),
    ({"evaluation.earlyStoppingPatience": 2, "dataset.validationSplit": 0}, False),
    ({"evaluation.earlyStoppingPatience": 2, "dataset.validationSplit": 0, "dataset.validationPath": "v.jsonl"}, True),
    ({"checkpoints.graceSeconds": 60, "terminationGracePeriodSeconds": 60}, False),
    ({"checkpoints.graceSeconds": 59.5, "terminationGracePeriodSeconds": 60}, True),
    ({"storage.existingClaim": "data", "storage.deleteWithRun": True}, False),
    ({"storage.existingClaim": "data"}, True),
    ({"env": [{"name": "A", "value": "1"}]}, True),
    ({"env": [{"name": "A"}]}, False),
    ({"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, False),
    ({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, True),
    ({"env": [{"name": "A", "valueFrom": {}}]}, False),
]


@pytest.mark.parametrize(("patch", "valid"), AGREEMENT)
def test_cel_rules_and_pydantic_agree(patch, valid):
    spec = with_(patch)
    try:
        stored = defaulted(spec)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
        # The API server would default the fields pydantic refused to build; do it by hand.
        stored = _default_loosely(spec)
    cel_ok = all(cel(rule, obj) for _, rule, obj in rules_at(stored, SPEC_SCHEMA) if "oldSelf" not in rule)
    assert (pydantic_ok, cel_ok) == (valid, valid)


def _default_loosely(spec: dict[str, Any]) -> dict[str, Any]:
    base = defaulted(VALID)
    out = copy.deepcopy(base)
    for section, value in spec.items():
        if isinstance(value, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **value}
        else:
            out[section] = value
    return out


def changed_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {**value, "changed": 1}
    if isinstance(value, list):
        return [*value, "changed"]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-changed"


def test_the_name_must_leave_room_for_the_children_suffixes():
    (rule,) = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert cel(rule["rule"], {"metadata": {"name": "r" * 52}})
    assert not cel(rule["rule"], {"metadata": {"name": "r" * 53}})


def test_spec_is_fixed_once_created_except_the_lifecycle_fields():
    old = defaulted(VALID)
    for path, rule, obj in rules_at(old, SPEC_SCHEMA):
        if "oldSelf" in rule:
            field = path.split(".")[1]
            assert field not in api.MUTABLE_FIELDS
            assert cel(rule, obj, old=obj)
            assert not cel(rule, changed_value(obj), old=obj), f"{path} may change"
    fixed = {p.split(".")[1] for p, r, _ in rules_at(old, SPEC_SCHEMA) if "oldSelf" in r}
    assert {"model", "dataset", "lora", "training", "resources", "storage"} <= fixed
    assert not fixed & set(api.MUTABLE_FIELDS)


@pytest.mark.parametrize("path", sorted(crd.ROOT.joinpath("examples").glob("trainingrun-*.yaml")), ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(path):
    import jsonschema

    manifest = yaml.safe_load(path.read_text())
    assert manifest["kind"] == api.KIND and manifest["apiVersion"] == f"{api.GROUP}/{api.VERSION}"
    jsonschema.Draft4Validator(SPEC_SCHEMA).validate(manifest["spec"])  # OpenAPI 3.0 keywords are draft 4's
