#!/usr/bin/python3
"""A strict local stand-in for Azure Key Vault, IMDS and Entra ID tokens.

There is no Key Vault emulator, so the azure provider's tests run against
this server. It reproduces the published request and response shapes of:

- IMDS managed identity tokens:
  GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...
  (header `Metadata: true`; `expires_in` is a string, as IMDS sends it)
- Entra ID client credentials (v2.0):
  POST /{tenant}/oauth2/v2.0/token (form: grant_type, client_id,
  client_secret, scope)
- Key Vault data plane (api-version 7.4/7.5/7.6):
  GET /keys/{name}[/{version}]                -> KeyBundle
  POST /keys/{name}/{version}/wrapkey|unwrapkey -> KeyOperationResult
  errors as {"error": {"code", "message", "innererror"?}}

and is strict where the service is: unknown api-version, an algorithm other
than RSA-OAEP-256, a missing or unknown bearer token, a missing Metadata
header are all rejected with the service's status and error shape.

Test controls (no auth, under /_test/): create or rotate a key, disable or
enable a version, delete or recover a key, forbid (RBAC) or allow, revoke
all tokens, reject every token (401), queue IMDS failures, read the
request log.

Usage: azure_kv.py PORT_FILE  (binds 127.0.0.1:0, writes the port to PORT_FILE)
"""

import base64
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

API_VERSIONS = {"7.4", "7.5", "7.6"}
RESOURCES = {"https://vault.azure.net", "https://managedhsm.azure.net"}
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT = "contoso-tenant"
CLIENT_SECRET = "test-client-secret-value"

lock = threading.Lock()
keys = {}  # name -> {"versions": [{"id", "key", "enabled", "created"}], "deleted": bool}
tokens = set()
forbidden = False
reject_tokens = False  # every bearer token answered 401 (audience/issuer mismatch)
imds_failures = []  # statuses to answer before succeeding
throttle = []  # (status, retry_after) to answer Key Vault requests with, in order
request_log = []


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def oaep256():
    return padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # --- plumbing -----------------------------------------------------
    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def kv_error(self, status, code, message, inner=None, headers=None):
        error = {"code": code, "message": message}
        if inner:
            error["innererror"] = {"code": inner}
        self.reply(status, {"error": error}, headers)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def split(self):
        url = urllib.parse.urlsplit(self.path)
        return url.path, urllib.parse.parse_qs(url.query)

    def vault_url(self):
        return "http://%s" % self.headers.get("Host")

    # --- dispatch -----------------------------------------------------
    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        path, query = self.split()
        raw = self.body()
        with lock:
            request_log.append(
                {
                    "method": method,
                    "path": path,
                    "api_version": (query.get("api-version") or [None])[0],
                    "authorization": "Bearer" if self.headers.get("Authorization", "").startswith("Bearer ") else None,
                    "time": time.monotonic(),
                }
            )
        if path.startswith("/_test/"):
            return self.control(path, raw)
        if path == "/metadata/identity/oauth2/token" and method == "GET":
            return self.imds(query)
        if path.endswith("/oauth2/v2.0/token") and method == "POST":
            return self.client_credentials(path, raw)
        if path.startswith("/keys/"):
            return self.key_vault(method, path, query, raw)
        self.kv_error(404, "NotFound", "The requested resource was not found.")

    # --- tokens ---------------------------------------------------------
    def issue(self):
        token = "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(32)
        with lock:
            tokens.add(token)
        return token

    def imds(self, query):
        if self.headers.get("Metadata") != "true":
            return self.reply(
                400,
                {"error": "invalid_request", "error_description": "Required metadata header not specified"},
            )
        if (query.get("api-version") or [""])[0] not in ("2018-02-01", "2019-08-01"):
            return self.reply(400, {"error": "invalid_request", "error_description": "Required query variable 'api-version' is missing or not supported"})
        resource = (query.get("resource") or [""])[0]
        if resource not in RESOURCES:
            return self.reply(400, {"error": "invalid_resource", "error_description": "AADSTS500011: The resource principal named %s was not found" % resource})
        client_id = query.get("client_id")
        if client_id and client_id != [CLIENT_ID]:
            return self.reply(400, {"error": "invalid_request", "error_description": "Identity not found"})
        with lock:
            failure = imds_failures.pop(0) if imds_failures else None
        if failure:
            return self.reply(failure, {"error": "temporarily_unavailable", "error_description": "IMDS answered %d" % failure})
        now = int(time.time())
        self.reply(
            200,
            {
                "access_token": self.issue(),
                "refresh_token": "",
                "expires_in": "3599",
                "expires_on": str(now + 3599),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            },
        )

    def client_credentials(self, path, raw):
        form = urllib.parse.parse_qs(raw.decode())
        get = lambda k: (form.get(k) or [""])[0]
        tenant = path.split("/")[1]
        if tenant != TENANT:
            return self.reply(400, {"error": "invalid_request", "error_description": "AADSTS90002: Tenant '%s' not found." % tenant})
        if get("grant_type") != "client_credentials":
            return self.reply(400, {"error": "unsupported_grant_type", "error_description": "AADSTS70003"})
        if get("client_id") != CLIENT_ID or get("client_secret") != CLIENT_SECRET:
            return self.reply(401, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})
        if get("scope").rstrip("/") not in {r + "/.default" for r in RESOURCES}:
            return self.reply(400, {"error": "invalid_scope", "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid."})
        self.reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": self.issue()})

    # --- key vault ------------------------------------------------------
    def key_vault(self, method, path, query, raw):
        version = (query.get("api-version") or [None])[0]
        if version is None:
            return self.kv_error(400, "BadParameter", "api-version query parameter is required")
        if version not in API_VERSIONS:
            return self.kv_error(400, "BadParameter", "The specified version (%s) is not recognized. Consider using the latest supported version (7.6)." % version)
        with lock:
            throttled = throttle.pop(0) if throttle else None
        if throttled is not None:
            status, retry_after = throttled
            code = "Throttled" if status == 429 else "ServiceUnavailable"
            return self.kv_error(status, code, "Rate limit exceeded. Try again after %d seconds." % retry_after,
                                 headers={"Retry-After": str(retry_after)})
        auth = self.headers.get("Authorization", "")
        challenge = {"WWW-Authenticate": 'Bearer authorization="https://login.microsoftonline.com/%s", resource="https://vault.azure.net"' % TENANT}
        if not auth.startswith("Bearer "):
            return self.kv_error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", headers=challenge)
        with lock:
            valid = auth[7:] in tokens and not reject_tokens
        if not valid:
            return self.kv_error(401, "Unauthorized", "AKV10022: Invalid audience or expired token.", headers=challenge)
        parts = path.strip("/").split("/")
        if method == "GET" and len(parts) in (2, 3):
            return self.get_key(parts[1], parts[2] if len(parts) == 3 else None)
        if method == "POST" and len(parts) == 4 and parts[3] in ("wrapkey", "unwrapkey"):
            return self.key_operation(parts[1], parts[2], parts[3], raw)
        self.kv_error(405, "MethodNotAllowed", "The requested method is not allowed.")

    def find(self, name, version):
        entry = keys.get(name)
        if entry is None or entry["deleted"]:
            return None, None
        versions = entry["versions"]
        if version in (None, ""):
            return entry, versions[-1]
        for v in versions:
            if v["id"] == version:
                return entry, v
        return entry, None

    def bundle(self, name, v):
        numbers = v["key"].public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return {
            "key": {
                "kid": "%s/keys/%s/%s" % (self.vault_url(), name, v["id"]),
                "kty": "RSA",
                "key_ops": v.get("key_ops", ["encrypt", "decrypt", "wrapKey", "unwrapKey"]),
                "n": b64url(n),
                "e": b64url(e),
            },
            "attributes": dict(
                {
                    "enabled": v["enabled"],
                    "created": v["created"],
                    "updated": v["created"],
                    "recoveryLevel": v.get("recoveryLevel", "Recoverable+Purgeable"),
                    "recoverableDays": 90,
                },
                **({"exp": v["exp"]} if "exp" in v else {}),
            ),
        }

    def not_found(self, name):
        self.kv_error(404, "KeyNotFound", "A key with (name/id) %s was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command." % name)

    def forbid(self, operation):
        self.kv_error(
            403,
            "Forbidden",
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nAction: 'Microsoft.KeyVault/vaults/keys/%s/action'" % operation,
            inner="ForbiddenByRbac",
        )

    def get_key(self, name, version):
        with lock:
            if forbidden:
                return self.forbid("read")
            entry, v = self.find(name, version)
        if v is None:
            return self.not_found(name if version is None else "%s/%s" % (name, version))
        self.reply(200, self.bundle(name, v))

    def key_operation(self, name, version, operation, raw):
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self.kv_error(400, "BadParameter", "The request body is not valid JSON.")
        alg = body.get("alg")
        value = body.get("value")
        if not alg or not isinstance(value, str):
            return self.kv_error(400, "BadParameter", "Property 'alg' and 'value' are required.")
        if alg != "RSA-OAEP-256":
            return self.kv_error(400, "BadParameter", "Invalid algorithm: %s is not supported by this test vault (expects RSA-OAEP-256)." % alg)
        with lock:
            if forbidden:
                return self.forbid("wrap" if operation == "wrapkey" else "unwrap")
            entry, v = self.find(name, version)
            if v is None:
                return self.not_found("%s/%s" % (name, version))
            if not v["enabled"]:
                op = "wrapKey" if operation == "wrapkey" else "unwrapKey"
                return self.kv_error(403, "Forbidden", "Operation %s is not allowed on a disabled key." % op, inner="KeyDisabled")
            key = v["key"]
        try:
            data = unb64url(value)
        except ValueError:
            return self.kv_error(400, "BadParameter", "Property 'value' is not valid base64url.")
        kid = "%s/keys/%s/%s" % (self.vault_url(), name, v["id"])
        if operation == "wrapkey":
            out = key.public_key().encrypt(data, oaep256())
        else:
            try:
                out = key.decrypt(data, oaep256())
            except ValueError:
                return self.kv_error(400, "BadParameter", "Error decrypting data: the ciphertext is invalid.")
        self.reply(200, {"kid": kid, "value": b64url(out)})

    # --- test controls ----------------------------------------------------
    def control(self, path, raw):
        global forbidden, reject_tokens
        parts = path.strip("/").split("/")[1:]
        args = json.loads(raw or b"{}")
        with lock:
            if parts[:1] == ["keys"] and len(parts) == 2:
                name = parts[1]
                entry = keys.setdefault(name, {"versions": [], "deleted": False})
                version = secrets.token_hex(16)
                new = {
                    "id": version,
                    "key": rsa.generate_private_key(public_exponent=65537, key_size=int(args.get("key_size", 2048))),
                    "enabled": True,
                    "created": int(time.time()),
                }
                # Test controls for the key-safety checks: recoveryLevel,
                # exp (seconds since the epoch), key_ops.
                for field in ("recoveryLevel", "exp", "key_ops"):
                    if field in args:
                        new[field] = args[field]
                entry["versions"].append(new)
                return self.reply(200, {"version": version})
            if parts[:1] == ["keys"] and len(parts) == 3:
                name, action = parts[1], parts[2]
                entry = keys.get(name)
                if entry is None:
                    return self.reply(404, {"error": "no such key"})
                if action == "attributes":
                    v = entry["versions"][-1]
                    for field in ("recoveryLevel", "exp", "key_ops"):
                        if field in args:
                            v[field] = args[field]
                elif action in ("disable", "enable"):
                    for v in entry["versions"]:
                        if args.get("version") in (None, v["id"]):
                            v["enabled"] = action == "enable"
                elif action == "delete":
                    entry["deleted"] = True
                elif action == "recover":
                    entry["deleted"] = False
                return self.reply(200, {})
            if parts == ["forbid"]:
                forbidden = True
                return self.reply(200, {})
            if parts == ["allow"]:
                forbidden = False
                return self.reply(200, {})
            if parts == ["reject-tokens"]:
                reject_tokens = bool(args.get("reject", True))
                return self.reply(200, {})
            if parts == ["revoke-tokens"]:
                tokens.clear()
                return self.reply(200, {})
            if parts == ["throttle"]:
                throttle[:] = [(int(s), int(args.get("retry_after", 1))) for s in args.get("statuses", [])]
                return self.reply(200, {})
            if parts == ["imds-failures"]:
                imds_failures[:] = list(args.get("statuses", []))
                return self.reply(200, {})
            if parts == ["log"]:
                return self.reply(200, request_log)
        self.reply(404, {"error": "unknown control"})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
