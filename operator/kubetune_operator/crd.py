"""Render the TrainingRun CRD from the pydantic models in api.py.

    python -m kubetune_operator.crd            # writes crds/trainingrun.yaml and the chart's copy
    python -m kubetune_operator.crd --check    # exits 1 if either file is stale

Pydantic's JSON schema is turned into a Kubernetes structural schema: references
inlined, `X | None` as X (nullable only where null means something else than unset,
see `structural`), titles dropped, `additionalProperties: false` dropped
(structural schemas forbid it beside properties; the API server prunes unknown fields
and the operator re-validates with `extra="forbid"`), exclusive bounds in OpenAPI v3
form, `default: {}` on sections whose fields all have defaults (so the API server fills
them in), and each model's `cel_rules` as x-kubernetes-validations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune_operator import api
from kubetune_operator import constants as c

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (ROOT / "crds" / "trainingrun.yaml", ROOT / "helm" / "kubetune" / "crds" / "trainingrun.yaml")
HEADER = "# Generated from operator/kubetune_operator/api.py by `python -m kubetune_operator.crd`. Do not edit.\n"


def _models_by_title(model: type[BaseModel], found: dict[str, type[BaseModel]] | None = None) -> dict:
    """Pydantic names $defs after the class: map those names back to the classes (for cel_rules)."""
    found = {} if found is None else found
    found[model.__name__] = model
    for field in model.model_fields.values():
        for candidate in _annotation_models(field.annotation):
            if candidate.__name__ not in found:
                _models_by_title(candidate, found)
    return found


def _annotation_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _annotation_models(arg)]


def structural(model: type[BaseModel], nullable: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model.

    An `X | None` field is `nullable` where null is a value of its own. With `nullable=False` (the spec) only
    fields whose default is not null keep it (metricsPort: null turns metrics off): elsewhere null means unset,
    and the API server prunes a null of a field that is not nullable before defaulting and validation, as it
    would refuse it against an enum (imagePullPolicy: null) or a type. The status keeps every null (the trainer
    writes null for a loss that is not finite)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _models_by_title(model)
    return _convert(raw, defs, models, model.__name__, nullable)


def _convert(
    node: dict[str, Any],
    defs: dict[str, Any],
    models: dict[str, type[BaseModel]],
    name: str | None,
    nullable: bool = True,
) -> dict:
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[ref], **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs, models, ref, nullable)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1 and len(options) < len(node["anyOf"]):
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            out = _convert({**options[0], **rest}, defs, models, None, nullable)
            if out.get("default", 0) is None:
                del out["default"]
            if nullable or "default" in out:
                out["nullable"] = True
            return _ordered(out)
        raise ValueError(f"cannot render a union as a structural schema: {node}")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties" and (value is False or (value is True and "properties" in node)):
            continue  # structural schemas allow neither beside properties; unknown fields are pruned
        if key == "properties":
            out["properties"] = {p: _convert(v, defs, models, None, nullable) for p, v in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs, models, None, nullable)
            # An item is never absent, so a default there is never applied, but the API server still checks it
            # against the item's rules: `{}` for a toleration fails "a key unless operator is Exists".
            out["items"].pop("default", None)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = _convert(value, defs, models, None, nullable)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "minLength" and node.get("type") == "array":
            out["minItems"] = value
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        # A section whose fields all default: default it to {} so the API server fills them in.
        if not required and "default" not in out:
            out["default"] = {}
        model = models.get(name or "")
        rules = getattr(model, "cel_rules", ())
        if rules:
            out["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in rules]
    return _ordered(out)


_ORDER = (
    "description",
    "type",
    "nullable",
    "default",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "x-kubernetes-int-or-string",
    "anyOf",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "items",
    "additionalProperties",
    "required",
    "properties",
    "x-kubernetes-validations",
)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Keys in a reading order (description first, nested properties last) for the generated file."""
    rank = {k: i for i, k in enumerate(_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _immutable(spec: dict[str, Any]) -> None:
    """Every spec field but api.MUTABLE_FIELDS is fixed once the run exists.

    A field's own `self == oldSelf` runs only when the field is there before and after, so an optional
    field without a default (image, queueName, ...) could still be added or removed: a rule on the spec
    itself closes that."""
    required = set(spec.get("required", []))
    presence = []
    for field, schema in spec["properties"].items():
        if field in api.MUTABLE_FIELDS:
            continue
        rules = schema.setdefault("x-kubernetes-validations", [])
        rules.append(
            {
                "rule": "self == oldSelf",
                "message": f"{field} cannot change after the run is created; create a new TrainingRun",
            }
        )
        if field not in required and "default" not in schema:
            presence.append(
                {
                    "rule": f"has(self.{field}) == has(oldSelf.{field})",
                    "message": f"{field} cannot be added or removed after the run is created; create a new TrainingRun",
                }
            )
    spec.setdefault("x-kubernetes-validations", []).extend(presence)


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the run is in its life."},
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of the optimizer steps done.",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Optimizer steps done."},
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.trainLoss",
        "description": "Latest training loss.",
    },
    {
        "name": "Eval",
        "type": "number",
        "jsonPath": ".status.progress.evalLoss",
        "description": "Latest validation loss.",
    },
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "description": "Estimated time left."},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "priority": 1,
        "description": "Why the run is in its phase.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


NAME_RULE = {
    "rule": f"size(self.metadata.name) <= {c.MAX_RUN_NAME}",
    "message": f"metadata.name may have at most {c.MAX_RUN_NAME} characters: the run's Jobs and volume add a suffix",
}


def render() -> dict[str, Any]:
    spec = structural(api.TrainingRunSpec, nullable=False)
    _immutable(spec)
    status = structural(api.TrainingRunStatus)
    status.pop("default", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}", "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A LoRA fine-tuning run: what to train and how to run it.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_text() -> str:
    return HEADER + yaml.safe_dump(render(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    text = render_text()
    stale = [t for t in TARGETS if not t.exists() or t.read_text() != text]
    if args.check:
        for target in stale:
            print(f"{target.relative_to(ROOT)} is stale: run python -m kubetune_operator.crd", file=sys.stderr)
        return 1 if stale else 0
    for target in stale:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
