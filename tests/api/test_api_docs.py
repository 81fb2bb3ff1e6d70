"""docs/api.md is the contract the app keeps: its route table lists exactly the routes the app serves, each with the
statuses of the OpenAPI document, and its error table lists exactly the error types the code can produce, each with
the statuses it is sent with. The README's route table lists the same routes."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

import server.api.errors
from server.api.errors import CLIENT_CLOSED_REQUEST, ERROR_TYPE_BY_STATUS
from server.api.schemas import ErrorResponse

ROOT = Path(__file__).resolve().parents[2]
API_PAGE = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
SERVER = ROOT / "server"
METHODS = "GET|POST|PUT|DELETE|PATCH"
Operation = tuple[str, str]  # (method, path)


def section(page: Path, heading: str) -> str:
    text = page.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of the markdown tables in `text` (header and rule rows too)."""
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in text.splitlines() if line[:1] == "|"]


def documented_routes(page: Path) -> dict[Operation, list[str]]:
    """Each route named in the first cell of a row of the page's `## Routes` table, with the row's other cells."""
    routes = {}
    for cells in table_rows(section(page, "## Routes")):
        for method, path in re.findall(rf"`({METHODS}) (/[^`]*)`", cells[0]):
            routes[(method, path)] = cells[1:]
    return routes


def served_routes(app: FastAPI) -> set[Operation]:
    """Every operation of the OpenAPI document, and FastAPI's own pages (the document and its two renderings)."""
    document = app.openapi()
    pages = {("GET", url) for url in (app.openapi_url, app.docs_url, app.redoc_url) if url is not None}
    return {(method.upper(), path) for path, operations in document["paths"].items() for method in operations} | pages


def test_no_route_is_left_out_of_the_openapi_document() -> None:
    """What makes the document the list of served routes (FastAPI's own pages aside)."""
    for path in SERVER.rglob("*.py"):
        assert "include_in_schema" not in path.read_text(), f"{path}: a route the OpenAPI document leaves out"


def statuses(cell: str) -> set[str]:
    return set(re.findall(r"\d{3}", cell))


def test_every_served_route_is_documented_and_every_documented_route_is_served(client: TestClient) -> None:
    served = served_routes(typing.cast(FastAPI, client.app))
    for page in (API_PAGE, README):
        documented = set(documented_routes(page))
        assert served - documented == set(), f"{page.name}: served but not documented"
        assert documented - served == set(), f"{page.name}: documented but not served"


def test_every_documented_route_answers_as_a_route(client: TestClient) -> None:
    """Asked without a body or a real id, each route answers in its own words, never the app's "no such route"."""
    for method, path in documented_routes(API_PAGE):
        response = client.request(method, re.sub(r"\{\w+\}", "x", path))
        assert response.status_code != 405, f"{method} {path}"
        assert "expected a route of the promptserve API" not in response.text, f"{method} {path}"


def test_each_documented_route_has_the_statuses_of_the_openapi_document(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    documented = documented_routes(API_PAGE)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            success, errors = documented[(method.upper(), path)]
            expected = set(operation["responses"])
            assert statuses(success) | statuses(errors) | {"500"} == expected, f"{method.upper()} {path}"


def documented_error_types() -> dict[str, set[int]]:
    """The `## Errors` table: each error type and the statuses it is sent with."""
    rows = table_rows(section(API_PAGE, "## Errors"))
    return {cells[0].strip("`"): {int(s) for s in statuses(cells[1])} for cells in rows if statuses(cells[1])}


def api_error_calls() -> list[tuple[str, ast.Call]]:
    """Every `ApiError(status, error_type, ...)` the server constructs, with the function it is built in."""
    calls = []
    for path in SERVER.rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                calls += [
                    (function.name, node)
                    for node in ast.walk(function)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ApiError"
                ]
    return calls


def constant_status(node: ast.expr) -> int | None:
    """A status written as a number or as a module constant of server.api.errors; None when computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(server.api.errors, node.id, None), int):
        value: Any = getattr(server.api.errors, node.id)
        return int(value)
    return None


def produced_error_types() -> dict[str, set[int]]:
    """What the code can send: every ApiError built with a literal type, the statuses framework errors map to, and
    the header timeout's answer written by hand (server/api/serving.py). Statuses computed at run time (a body
    that is not JSON: 400, else 422) are left out; their types are not."""
    produced: dict[str, set[int]] = {}
    for status, error_type in ERROR_TYPE_BY_STATUS.items():
        produced.setdefault(error_type, set()).add(status)
    for function, call in api_error_calls():
        kind = call.args[1]
        if not (isinstance(kind, ast.Constant) and isinstance(kind.value, str)):
            assert function == "from_http_exception", f"{function}: an error type this test cannot read"
            continue  # from_http_exception: ERROR_TYPE_BY_STATUS, else validation or internal (both built above too)
        status = constant_status(call.args[0])
        produced.setdefault(kind.value, set()).update(() if status is None else (status,))
    for error_type in re.findall(r'"error_type": "(\w+)"', (SERVER / "api" / "serving.py").read_text()):
        produced.setdefault(error_type, set()).add(408)
    return produced


def test_the_documented_error_types_are_those_the_code_produces() -> None:
    documented, produced = documented_error_types(), produced_error_types()
    assert set(documented) == set(produced)
    for error_type, sent in produced.items():
        assert sent <= documented[error_type], f"{error_type}: sent with {sent}, documented {documented[error_type]}"


def test_the_openapi_error_body_names_every_error_type_a_client_can_receive() -> None:
    received = {kind for kind, sent in documented_error_types().items() if sent != {CLIENT_CLOSED_REQUEST}}
    assert set(typing.get_args(ErrorResponse.model_fields["error_type"].annotation)) == received
