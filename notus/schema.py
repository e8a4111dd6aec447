"""Writes .cog/openapi_schema.json for a predictor, as `cog build` would.

The Cog HTTP server validates inputs (422 with the reason) and allows SSE streaming only when this
file exists; `cog build` writes it with Go code we cannot run without Docker. This mirrors that
code's output (cog's pkg/schema/openapi_spec.go) from cog's own inspection of the predictor, so
`scripts/serve` behaves like the built image.

Streaming (`x-cog-streaming`) is decided as the builder decides it (pkg/schema/python/annotations.go):
from the source, where the predict method must be decorated with `@cog.streaming` (or `streaming`
imported from cog). The decorator does nothing at run time, so only reading the source shows that
it is missing, here in our tests instead of as 406s after `cog push`. The same goes for
`@cog.concurrent(max=N)`, which the builder turns into the image's COG_MAX_CONCURRENCY.

Checked against the builder for predict.py's shape (`async def predict(...) -> ConcatenateIterator[str]`
returning a plain generator, notus/coglet_stream.py): pkg/schema/python reads the return annotation's
text, so ConcatenateIterator and AsyncConcatenateIterator both give the concatenated iterator Output
(schema_type.go), and streaming needs only @streaming plus an iterator output; what the function
returns at run time is not looked at.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def title_case(name: str) -> str:
    return " ".join(word.capitalize() for word in name.split("_"))


def _number(value: float) -> int | float:
    # Go writes float64(1) as 1: keep integral bounds integral.
    return int(value) if float(value).is_integer() else value


def input_schema(info) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        prop: dict[str, Any] = {"x-order": field.order, "title": title_case(name)}
        prop.update(field.type.json_type())
        nullable = field.type.repetition.name in ("OPTIONAL", "OPTIONAL_REPEATED")
        has_default = field.default is not None or nullable
        if not has_default and field.type.repetition.name in ("REQUIRED", "REPEATED"):
            required.append(name)
        if field.default is not None:
            prop["default"] = field.default
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.choices:
            raise NotImplementedError("choices are not used by this predictor")
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _cog_decorators(source: str, class_name: str) -> tuple[ast.AST, dict[str, ast.expr]]:
    """The class's run() (else predict()) and its decorators from cog, by name ("streaming", "concurrent")."""
    tree = ast.parse(source)
    # Top-level imports only, as the builder reads them: `import cog [as c]`, `from cog import streaming [as s]`.
    cog_names, imported = set(), {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            cog_names |= {a.asname or a.name for a in node.names if a.name == "cog"}
        elif isinstance(node, ast.ImportFrom) and node.module == "cog" and not node.level:
            imported |= {a.asname or a.name: a.name for a in node.names}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    if not classes:
        raise ValueError(f"class {class_name} not found")
    methods = {n.name: n for n in classes[0].body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    method = methods.get("run") or methods.get("predict")
    if method is None:
        raise ValueError(f"{class_name} must define run() or predict()")
    found = {}
    for decorator in method.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in cog_names:
            found.setdefault(target.attr, decorator)
        elif isinstance(target, ast.Name) and target.id in imported:
            found.setdefault(imported[target.id], decorator)
    return method, found


def declares_streaming(source: str, class_name: str) -> bool:
    """Whether the class's run() (else predict()) carries cog's @streaming decorator."""
    return "streaming" in _cog_decorators(source, class_name)[1]


def declared_concurrency(source: str, class_name: str) -> int | None:
    """N of `@cog.concurrent(max=N)`, as the builder reads it (a literal int; bare: 1); None without it.

    `cog build` bakes N into the image as COG_MAX_CONCURRENCY, the only thing the server reads.
    """
    method, found = _cog_decorators(source, class_name)
    decorator = found.get("concurrent")
    if decorator is None:
        return None
    if not isinstance(decorator, ast.Call) or not (decorator.args or decorator.keywords):
        return 1
    keywords = decorator.keywords
    if decorator.args or len(keywords) != 1 or keywords[0].arg != "max":
        raise ValueError("@concurrent only supports literal integer max=... arguments")
    value = keywords[0].value
    if not (isinstance(value, ast.Constant) and type(value.value) is int):
        raise ValueError("@concurrent max must be an integer literal")
    if value.value < 1:
        raise ValueError("@concurrent max must be at least 1")
    if value.value > 1 and not isinstance(method, ast.AsyncFunctionDef):
        raise ValueError("@cog.concurrent(max > 1) requires an async run() or predict() method")
    return value.value


def openapi_schema(predictor_ref: str = "predict.py:Predictor") -> dict[str, Any]:
    """The schema of `file.py:Class` (as cog.yaml names it), relative to the working directory."""
    from cog import _inspector

    path, class_name = predictor_ref.split(":")
    sys.path.insert(0, str(Path(path).resolve().parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor/predict() are still served
        info = _inspector.create_predictor(Path(path).stem, class_name)
    output = info.output.json_type()
    streaming = declares_streaming(Path(path).read_text(), class_name)
    if streaming and output.get("x-cog-array-type") != "iterator":
        raise ValueError("@streaming requires Iterator[...], AsyncIterator[...], ConcatenateIterator[...] or "
                         "AsyncConcatenateIterator[...] return type")
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    json_body = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    ok = {"description": "Successful Response", "content": json_body({})}
    invalid = {"description": "Validation Error", "content": json_body(ref("HTTPValidationError"))}
    predict_op: dict[str, Any] = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": {"content": json_body(ref("PredictionRequest"))},
        "responses": {
            "200": {"description": "Successful Response", "content": json_body(ref("PredictionResponse"))},
            "422": invalid,
        },
    }
    if streaming:
        predict_op["x-cog-streaming"] = True
    string = lambda title, **kw: {"title": title, "type": "string", **kw}  # noqa: E731
    return {
        "openapi": "3.0.2",
        # The builder writes its own version here; cog.yaml's sdk_version pins the same release.
        "info": {"title": "Cog", "version": importlib.metadata.version("cog")},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}},
            "/health-check": {
                "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": ok}}
            },
            "/predictions": {"post": predict_op},
            "/predictions/{prediction_id}/cancel": {
                "post": {
                    "summary": "Cancel",
                    "operationId": "cancel_predictions__prediction_id__cancel_post",
                    "parameters": [
                        {"required": True, "schema": string("Prediction Id"), "name": "prediction_id", "in": "path"}
                    ],
                    "responses": {"200": ok, "422": invalid},
                }
            },
        },
        "components": {
            "schemas": {
                "Input": input_schema(info),
                "Output": output,
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {"id": string("Id"), "input": ref("Input")},
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": ref("Input"),
                        "output": ref("Output"),
                        "id": string("Id"),
                        "version": string("Version"),
                        "created_at": string("Created At", format="date-time"),
                        "started_at": string("Started At", format="date-time"),
                        "completed_at": string("Completed At", format="date-time"),
                        "status": string("Status"),
                        "error": string("Error"),
                        "logs": string("Logs"),
                        "metrics": {"title": "Metrics", "type": "object"},
                    },
                },
                "Status": {
                    "title": "Status",
                    "description": "An enumeration.",
                    "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
                    "type": "string",
                },
                "HTTPValidationError": {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {"detail": {"title": "Detail", "type": "array", "items": ref("ValidationError")}},
                },
                "ValidationError": {
                    "title": "ValidationError",
                    "required": ["loc", "msg", "type"],
                    "type": "object",
                    "properties": {
                        "loc": {
                            "title": "Location",
                            "type": "array",
                            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        },
                        "msg": {"title": "Message", "type": "string"},
                        "type": {"title": "Error Type", "type": "string"},
                    },
                },
            }
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write .cog/openapi_schema.json as `cog build` would.")
    parser.add_argument("--out", default=".cog/openapi_schema.json")
    parser.add_argument("--predictor", default="predict.py:Predictor", help="file.py:Class, as cog.yaml's predict key")
    parser.add_argument("--concurrency", action="store_true",
                        help="print the COG_MAX_CONCURRENCY `cog build` bakes into the image (from @cog.concurrent), and exit")
    args = parser.parse_args(argv)
    if args.concurrency:
        path, class_name = args.predictor.split(":")
        print(declared_concurrency(Path(path).read_text(), class_name) or 1)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(openapi_schema(args.predictor), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
