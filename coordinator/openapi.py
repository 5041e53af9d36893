"""The REST API as an OpenAPI 3.1 document (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

from edge_sdk.wire import CONTENT_TYPE, PROTOCOL_VERSION

_ERROR = {"$ref": "#/components/responses/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_spec(version: str) -> dict[str, Any]:
    """The OpenAPI document; `version` is the package version."""
    wire = {
        "type": "string",
        "format": "binary",
        "description": f"fedlm wire format v{PROTOCOL_VERSION}",
    }
    bearer = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fedlm-edge coordinator",
            "version": version,
            "description": (
                "Federated LoRA coordinator. Binary bodies use the fedlm wire format "
                f"({CONTENT_TYPE}, protocol version {PROTOCOL_VERSION}). Every 4xx/5xx "
                "answer is a JSON error object."
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "JoinRequest": {
                    "type": "object",
                    "required": ["join_token"],
                    "properties": {
                        "join_token": {"type": "string"},
                        "name": {"type": "string", "maxLength": 128},
                    },
                },
                "JoinResponse": {
                    "type": "object",
                    "properties": {
                        "client_id": {"type": "string"},
                        "token": {"type": "string", "description": "bearer token, shown once"},
                        "task_id": {"type": "string"},
                    },
                },
                "UpdateAck": {
                    "type": "object",
                    "properties": {
                        "update_id": {"type": "string"},
                        "accepted": {"type": "boolean"},
                        "version": {"type": "integer"},
                        "pending": {"type": "integer"},
                    },
                },
            },
            "responses": {
                "Error": _json({"$ref": "#/components/schemas/Error"}, "error"),
            },
        },
        "paths": {
            "/v1/join": {
                "post": {
                    "summary": "Enroll a device with the join token; returns its bearer token.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/JoinRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/JoinResponse"}, "enrolled"),
                        "400": _ERROR,
                        "401": _ERROR,
                        "429": _ERROR,
                    },
                }
            },
            "/v1/task": {
                "get": {
                    "summary": "The task: model sha256, LoRA spec, codec, local training settings.",
                    "description": f"JSON by default; the wire TaskConfig with `Accept: {CONTENT_TYPE}`.",
                    "security": bearer,
                    "responses": {
                        "200": {
                            "description": "task",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                CONTENT_TYPE: {"schema": wire},
                            },
                        },
                        "401": _ERROR,
                    },
                }
            },
            "/v1/adapter": {
                "get": {
                    "summary": "The current global adapter (wire GlobalAdapter).",
                    "security": bearer,
                    "parameters": [
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "adapter; headers ETag and X-Fedlm-Version",
                            "content": {CONTENT_TYPE: {"schema": wire}},
                        },
                        "304": {"description": "unchanged since the ETag"},
                        "401": _ERROR,
                    },
                }
            },
            "/v1/updates": {
                "post": {
                    "summary": "Submit an adapter update (wire AdapterUpdate); acknowledged once durable.",
                    "security": bearer,
                    "requestBody": {"required": True, "content": {CONTENT_TYPE: {"schema": wire}}},
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/UpdateAck"}, "stored"),
                        "400": _ERROR,
                        "401": _ERROR,
                        "403": _ERROR,
                        "409": _ERROR,
                        "413": _ERROR,
                        "415": _ERROR,
                        "422": _ERROR,
                        "429": _ERROR,
                    },
                }
            },
            "/v1/status": {
                "get": {
                    "summary": "Rounds, clients, versions, recent metrics.",
                    "security": bearer,
                    "responses": {"200": _json({"type": "object"}, "status"), "401": _ERROR},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness.",
                    "responses": {"200": _json({"type": "object"}, "ok")},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "spec")},
                }
            },
        },
    }
