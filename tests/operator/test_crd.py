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
from kubetune_operator import constants as c
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


# Spec fields where null is a value of its own: it turns off what their (non-null) default turns on.
NULL_TURNS_OFF = {
    ".dataset.preparedDir",
    ".evaluation.maxGenerationSamples",
    ".checkpoints.everyMinutes",
    ".reporting.metricsPort",
}


def prune_nulls(obj: Any, schema: dict[str, Any]) -> Any:
    """What the API server does before defaulting and validation: drop each null where the schema is not
    nullable (there it means unset)."""
    if isinstance(obj, dict) and "properties" in schema:
        props = schema["properties"]
        return {
            k: prune_nulls(v, props.get(k, {}))
            for k, v in obj.items()
            if v is not None or props.get(k, {}).get("nullable")
        }
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune_nulls(v, schema["items"]) for v in obj]
    return obj


def test_in_the_spec_null_means_unset_except_where_it_turns_off_a_default():
    nullable = {path for path, node in walk(SPEC_SCHEMA) if node.get("nullable")}
    assert nullable == NULL_TURNS_OFF
    for path in nullable:
        default = at(SPEC_SCHEMA, path.lstrip("."))["default"]
        assert default is not None, path
    # The status keeps its nulls: the trainer writes null for a loss that is not finite.
    assert STATUS_SCHEMA["properties"]["reason"].get("nullable") is True


def test_an_explicit_null_is_accepted_as_unset():
    """A null on a nullable enum is refused by the API server (null is not one of the values): a manifest
    that writes `imagePullPolicy: null` or a toleration's `effect: null` (Helm templates, generators do) must
    apply. Not nullable, the null is pruned first."""
    import jsonschema

    spec = {
        **VALID,
        "imagePullPolicy": None,
        "image": None,
        "queueName": None,
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": None, "value": None}],
        "reporting": {"metricsPort": None},
    }
    stored = prune_nulls(spec, SPEC_SCHEMA)
    assert "imagePullPolicy" not in stored and stored["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert stored["reporting"] == {"metricsPort": None}, "null still turns the metrics off"
    # OpenAPI 3.0 keywords are draft 4's, but for nullable (metricsPort's, checked above).
    jsonschema.Draft4Validator(SPEC_SCHEMA).validate({k: v for k, v in stored.items() if k != "reporting"})
    assert api.TrainingRunSpec.model_validate(stored).reporting.metrics_port is None


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


STATUS_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for name in path.split("."):
        schema = schema["items"] if name == "[]" else schema["properties"][name]
    return schema


@pytest.mark.parametrize(
    ("schema", "path", "values"),
    [
        (SPEC_SCHEMA, "dataset.format", ["auto", "prompt_completion", "chat", "text"]),
        (SPEC_SCHEMA, "lora.bias", ["none", "all", "lora_only"]),
        (SPEC_SCHEMA, "training.precision", ["auto", "bf16", "fp16", "fp32"]),
        (SPEC_SCHEMA, "training.lrScheduler", ["cosine", "linear", "constant", "constant_with_warmup"]),
        (SPEC_SCHEMA, "model.attnImplementation", ["auto", "eager", "sdpa", "flash_attention_2"]),
        (SPEC_SCHEMA, "imagePullPolicy", ["Always", "IfNotPresent", "Never"]),
        (SPEC_SCHEMA, "tolerations.[].operator", ["Exists", "Equal"]),
        (SPEC_SCHEMA, "tolerations.[].effect", ["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        # ARCHITECTURE.md contract 4, and the operator's own constants.
        (STATUS_SCHEMA, "phase", ["Pending", "Initializing", "Queued", "Running", "Suspended", "Succeeded", "Failed"]),
        (STATUS_SCHEMA, "phase", list(c.PHASES)),
    ],
)
def test_enums_reach_the_schema(schema, path, values):
    assert at(schema, path)["enum"] == values


@pytest.mark.parametrize(
    ("schema", "obj"),
    [
        (SPEC_SCHEMA, {**VALID, "dataset": {"path": "d.jsonl", "format": "csv"}}),
        (SPEC_SCHEMA, {**VALID, "lora": {"bias": "some"}}),
        (SPEC_SCHEMA, {**VALID, "imagePullPolicy": "Sometimes"}),
        (SPEC_SCHEMA, {**VALID, "tolerations": [{"key": "k", "operator": "In"}]}),
        (STATUS_SCHEMA, {"phase": "Done"}),
    ],
)
def test_the_schema_rejects_a_value_outside_an_enum(schema, obj):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="is not one of"):
        jsonschema.Draft4Validator(schema).validate(obj)  # OpenAPI 3.0 keywords are draft 4's
    valid = {"phase": "Running"} if schema is STATUS_SCHEMA else VALID
    jsonschema.Draft4Validator(schema).validate(valid)


@pytest.mark.parametrize(
    ("value", "ok"), [("500m", True), ("32Gi", True), ("1.5e3", True), (4, True), ("lots", False), ("4 Gi", False)]
)
def test_a_quantity_is_checked_alike_by_the_crd_and_the_operator(value, ok):
    """An old CRD (or none) lets a bad one through: the operator names the field before any Job gets a 422."""
    import jsonschema

    from kubetune_operator.handlers import validate

    spec = {**VALID, "resources": {"cpu": value}}
    crd_ok = jsonschema.Draft4Validator(SPEC_SCHEMA).is_valid(spec)
    parsed, problem = validate(spec, "run")
    assert (crd_ok, parsed is not None) == (ok, ok), problem
    if not ok:
        assert f"spec.resources.cpu: must be a Kubernetes quantity such as 4, 500m or 32Gi, not {value!r}" in problem


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
    # Tolerations the API server would refuse on the pods (a 422 on the Job): refused on the run instead.
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}, True),
    ({"tolerations": [{"operator": "Exists"}]}, True),
    ({"tolerations": [{"key": "gpu", "value": "a100"}]}, True),
    ({"tolerations": [{"operator": "Equal", "value": "a100"}]}, False),
    ({"tolerations": [{"value": "a100"}]}, False),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "a100"}]}, False),
    ({"tolerations": [{"key": "gpu", "effect": "NoExecute", "tolerationSeconds": 30}]}, True),
    ({"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}]}, False),
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
    return schema_defaults(out, SPEC_SCHEMA)


def schema_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """The schema's defaults filled in, as the API server does before it runs the rules."""
    if isinstance(obj, dict) and "properties" in schema:
        filled = {k: copy.deepcopy(v["default"]) for k, v in schema["properties"].items() if "default" in v}
        filled.update(obj)
        return {k: schema_defaults(v, schema["properties"].get(k, {})) for k, v in filled.items()}
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [schema_defaults(v, schema["items"]) for v in obj]
    return obj


def test_every_default_passes_the_rules_of_its_own_schema():
    """The API server refuses a CRD whose default fails its schema's CEL rules (defaults are validated
    like objects, their nested defaults filled in first)."""
    defaults = [(path, node) for path, node in walk(SPEC_SCHEMA, "spec") if "default" in node]
    assert len(defaults) > 50
    for path, node in defaults:
        value = schema_defaults(copy.deepcopy(node["default"]), node)
        for where, rule, obj in rules_at(value, node, path):
            if "oldSelf" not in rule:
                assert cel(rule, obj), f"the default of {where} fails its rule {rule}"


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


def transition_rules(old: dict[str, Any], new: dict[str, Any]) -> Iterator[tuple[tuple[str, str], bool]]:
    """((path, rule), verdict) of every rule with oldSelf where the API server runs one: the field exists
    before and after."""
    olds = {path: obj for path, rule, obj in rules_at(old, SPEC_SCHEMA) if "oldSelf" in rule}
    for path, rule, obj in rules_at(new, SPEC_SCHEMA):
        if "oldSelf" in rule and path in olds:
            yield (path, rule), cel(rule, obj, old=olds[path])


def test_spec_is_fixed_once_created_except_the_lifecycle_fields():
    old = defaulted(VALID)
    fields = [p.split(".")[1] for p, r, _ in rules_at(old, SPEC_SCHEMA) if "oldSelf" in r and p != "spec"]
    for field in fields:
        assert field not in api.MUTABLE_FIELDS
        new = {**old, field: changed_value(old[field])}
        verdicts = dict(transition_rules(old, new))
        assert all(dict(transition_rules(old, old)).values())
        assert not all(verdicts.values()), f"spec.{field} may change"
    assert {"model", "dataset", "lora", "training", "resources", "storage"} <= set(fields)
    assert not set(fields) & set(api.MUTABLE_FIELDS)


# Optional fields without a default: absent unless set, so a rule on the field itself never sees them added
# or removed. The spec's own rules must.
OPTIONAL = {
    "image": "registry.local/trainer:2",
    "imagePullPolicy": "Always",
    "affinity": {"nodeAffinity": {}},
    "priorityClassName": "high",
    "hfTokenSecret": {"name": "hf", "key": "token"},
    "queueName": "team-a",
}


def test_optional_fields_cannot_be_added_or_removed_after_creation():
    absent = defaulted(VALID)
    unset = {f for f, schema in SPEC_SCHEMA["properties"].items() if f not in absent}
    assert unset - set(api.MUTABLE_FIELDS) == set(OPTIONAL), "every optional fixed field is covered here"
    for field, value in OPTIONAL.items():
        present = defaulted({**VALID, field: value})
        assert field in present
        for old, new, change in ((absent, present, "added"), (present, absent, "removed")):
            assert not all(dict(transition_rules(old, new)).values()), f"spec.{field} may be {change}"
    # The lifecycle fields may come and go.
    for field, value in (("activeDeadlineSeconds", 60), ("ttlSecondsAfterFinished", 0)):
        present = defaulted({**VALID, field: value})
        assert all(dict(transition_rules(absent, present)).values()), field
        assert all(dict(transition_rules(present, absent)).values()), field


def test_lists_and_strings_under_rules_are_bounded():
    """The API server estimates each CEL rule's cost from the bounds of what it reads; unbounded lists of
    unbounded strings can push a CRD past the limit. The Kubernetes fields here carry bounds."""
    props = SPEC_SCHEMA["properties"]
    assert props["tolerations"]["maxItems"] and props["env"]["maxItems"]
    assert props["nodeSelector"]["maxProperties"]
    for field in ("key", "value"):
        assert props["tolerations"]["items"]["properties"][field]["maxLength"]
    assert props["env"]["items"]["properties"]["value"]["maxLength"]


def test_status_conditions_are_a_map_keyed_by_type():
    status = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


@pytest.mark.parametrize("path", sorted(crd.ROOT.joinpath("examples").glob("trainingrun-*.yaml")), ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(path):
    import jsonschema

    manifest = yaml.safe_load(path.read_text())
    assert manifest["kind"] == api.KIND and manifest["apiVersion"] == f"{api.GROUP}/{api.VERSION}"
    jsonschema.Draft4Validator(SPEC_SCHEMA).validate(manifest["spec"])  # OpenAPI 3.0 keywords are draft 4's
