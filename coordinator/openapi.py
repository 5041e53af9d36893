"""The REST API as an OpenAPI 3.1 document (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

from coordinator.secure import PHASES as SECAGG_PHASES
from edge_sdk.wire import CONTENT_TYPE, PROTOCOL_VERSION

_ERROR = {"$ref": "#/components/responses/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_spec(version: str, join_max_bytes: int = 4096) -> dict[str, Any]:
    """The OpenAPI document; `version` is the package version."""
    wire = {
        "type": "string",
        "format": "binary",
        "description": f"fedlm wire format v{PROTOCOL_VERSION}",
    }
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    secagg = {
        "type": "string",
        "format": "binary",
        "description": "secure-aggregation message: b'FSAG' | version u8 | kind u8 | msgpack "
        "array of the fields (edge_sdk.secagg.messages); bounded by the round's packed "
        "vector length + 1 MiB",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fedlm-edge coordinator",
            "version": version,
            "description": (
                "Federated LoRA coordinator. Binary bodies use the fedlm wire format "
                f"({CONTENT_TYPE}, protocol version {PROTOCOL_VERSION}). Every 4xx/5xx "
                "answer is a JSON error object. Connection limits apply before any request "
                "is read: a connection beyond the per-address cap is answered 429 and one "
                "beyond the total cap 503 (code `too_many_connections`), and a connection "
                "whose request head or body does not arrive in time is closed."
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a client's token from POST /v1/join",
                },
                "operator": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the operator token (`fedlm coordinator --operator-token`)",
                },
            },
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
                    "description": f"At most {join_max_bytes} bytes of JSON (else 413).",
                    "required": ["join_token"],
                    "properties": {
                        "join_token": {"type": "string"},
                        "name": {
                            "type": "string",
                            "description": "device name; stored and logged printable only "
                            "(control characters become '?'), cut to 64 characters",
                        },
                    },
                },
                "JoinResponse": {
                    "type": "object",
                    "required": ["client_id", "token", "task_id"],
                    "properties": {
                        "client_id": {"type": "string"},
                        "token": {"type": "string", "description": "bearer token, shown once"},
                        "task_id": {"type": "string"},
                    },
                },
                "RecentUpdate": {
                    "type": "object",
                    "required": ["update_id", "client_id", "base_version", "num_examples"],
                    "properties": {
                        "update_id": {"type": "string"},
                        "client_id": {"type": "string"},
                        "base_version": {"type": "integer"},
                        "num_examples": {"type": "integer"},
                        "received_at": {"type": "number"},
                        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
                    },
                },
                "Status": {
                    "type": "object",
                    "description": (
                        "With a client token (`view: client`), `recent_updates` holds only that "
                        "client's updates and other clients appear only in the counts "
                        "(`clients`, `pending_clients`, `updates`). With the operator token "
                        "(`view: operator`), `recent_updates` holds every client's and "
                        "`client_list` the enrolled devices."
                    ),
                    "required": [
                        "task_id",
                        "version",
                        "round",
                        "view",
                        "clients",
                        "updates",
                        "recent_updates",
                    ],
                    "properties": {
                        "task_id": {"type": "string"},
                        "version": {"type": "integer"},
                        "round": {"type": "integer"},
                        "view": {"enum": ["client", "operator"]},
                        "client_id": {"type": "string", "description": "client view only"},
                        "clients": {"type": "integer"},
                        "pending": {"type": "integer"},
                        "pending_clients": {"type": "integer"},
                        "updates": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "recent_updates": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/RecentUpdate"},
                        },
                        "client_list": {
                            "type": "array",
                            "description": "operator view only",
                            "items": {
                                "type": "object",
                                "required": ["client_id", "name"],
                                "properties": {
                                    "client_id": {"type": "string"},
                                    "name": {"type": "string"},
                                    "joined_at": {"type": "number"},
                                    "updates": {"type": "integer"},
                                    "pending": {"type": "integer"},
                                },
                            },
                        },
                        "tls_fingerprint": {"type": ["string", "null"]},
                        "mdns_name": {"type": ["string", "null"]},
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
                        "413": _ERROR,
                        "429": _ERROR,
                    },
                }
            },
            "/v1/task": {
                "get": {
                    "summary": "The task: model sha256, LoRA spec, codec, local training settings.",
                    "description": "JSON by default; the wire TaskConfig "
                    f"with `Accept: {CONTENT_TYPE}`.",
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
                        "429": _ERROR,
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
                        "429": _ERROR,
                    },
                }
            },
            "/v1/updates": {
                "post": {
                    "summary": "Submit an adapter update (wire "
                    "AdapterUpdate); acknowledged once durable.",
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
                        "503": _ERROR,
                    },
                }
            },
            "/v1/secagg/{phase}": {
                "post": {
                    "summary": (
                        "Secure aggregation (only with `fedlm coordinator --secure`): one "
                        "protocol step. `setup` (msgpack {version}) joins the current round's "
                        "cohort and returns RoundSetup; `advertise`, `share_keys`, "
                        "`masked_input`, `unmask` take the device's FSAG message of that phase "
                        "(202); `next` (msgpack {round_id, phase}) long-polls for the device's "
                        "request of a phase (204: not open yet; 410: the round failed or the "
                        "phase closed without this device). See docs/secure-aggregation.md."
                    ),
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "phase",
                            "in": "path",
                            "required": True,
                            "schema": {
                                "type": "string",
                                # setup and next (the long poll), then the message phases
                                "enum": ["setup", "next", *SECAGG_PHASES],
                            },
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/vnd.fedlm.secagg": {"schema": secagg},
                            "application/msgpack": {
                                "schema": {
                                    "type": "object",
                                    "description": "setup: {version: int}; next: {round_id: "
                                    "bytes (16), phase: share_keys | masked_input | unmask}; "
                                    "at most 1024 bytes",
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "setup / next: the coordinator's FSAG message",
                            "content": {"application/vnd.fedlm.secagg": {"schema": secagg}},
                        },
                        "202": _json({"type": "object"}, "the phase message was accepted"),
                        "204": {"description": "next: the phase is not open yet; ask again"},
                        "400": _ERROR,
                        "401": _ERROR,
                        "403": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                        "410": _ERROR,
                        "413": _ERROR,
                        "429": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/v1/status": {
                "get": {
                    "summary": "Rounds, clients, versions, recent metrics (scoped to the caller).",
                    "security": [{"bearer": []}, {"operator": []}],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Status"}, "status"),
                        "401": _ERROR,
                        "429": _ERROR,
                    },
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
