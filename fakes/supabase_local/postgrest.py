"""A small PostgREST-compatible HTTP endpoint in front of a real PostgreSQL, so that the unmodified supabase-py
client can run against real migrations, real roles and real RLS (PostgREST itself cannot be installed here).

It serves what supabase-py's postgrest client sends, the way Supabase (gateway + PostgREST 12) answers:

* `/rest/v1/<table>`: GET/HEAD (`select=` with columns, `alias:col`, `col::cast`, `col->key`/`col->>key`;
  filters `eq neq gt gte lt lte like ilike match imatch in is isdistinct cs cd ov sl sr nxl nxr adj fts plfts
  phfts wfts`, `not.` negation, `(any)`/`(all)` modifiers, `or=(...)`/`and=(...)` trees; `order=`; `limit`,
  `offset`, `Range`; `Prefer: count=exact|planned|estimated` -> `Content-Range`; at most `max_rows` rows);
  POST insert (object or array, `columns=`, `Prefer: return=representation|minimal`, `missing=default`) and
  upsert (`Prefer: resolution=merge-duplicates|ignore-duplicates`, `on_conflict=`, default: the primary key);
  PATCH and DELETE with filters (`Prefer: handling=strict, max-affected=N`); `Accept:
  application/vnd.pgrst.object+json` (`.single()`, 406 PGRST116 unless exactly one row); `Prefer: tx=rollback`;
  `Accept-Profile`/`Content-Profile` (only the configured schemas; else 406 PGRST106).
* `/rest/v1/rpc/<function>`: POST (JSON object of named arguments) or GET (arguments in the query string);
  scalar, composite and set-returning functions (filters/order/limit apply to set-returning composite ones);
  void functions answer 204.
* Auth: the gateway's `apikey` header (or query parameter) is required and must be a JWT signed with the secret
  (or one of `api_keys`), else 401; `Authorization: Bearer <jwt>` (defaults to the apikey) is verified HS256
  (`exp`/`nbf` with 30 s leeway, no audience check, as PostgREST), else 401 PGRST301 with `WWW-Authenticate`.
  The role is the `role` claim (default `anon`).
* Per request, on a connection as `authenticator` (NOINHERIT, granted the API roles): `BEGIN [READ ONLY]`,
  `set_config('role', <role>, true)` (what PostgREST runs: SET LOCAL ROLE), `set_config('request.jwt.claims',
  <claims json>, true)` plus `search_path`, `request.method`, `request.path`, `request.headers`; the statement;
  `COMMIT`. Statements are composed with psycopg.sql (identifiers quoted, every value a bound parameter).
  JSON values are converted to column types by PostgreSQL (`json_populate_recordset`), results serialized by
  PostgreSQL (`json_agg`), as PostgREST does.
* Errors: PostgreSQL errors as `{code: SQLSTATE, details, hint, message}` with PostgREST's status mapping
  (23505/23503 -> 409, 42501 -> 401 for anon else 403, 42P01 -> 404, 08*/53*/57P0x -> 503, 25006 -> 405,
  P0001 -> 400, PTxyz -> xyz, other -> 400 ...); database unreachable -> 503 PGRST000; PostgREST's own
  PGRST100/102/106/116/124/125/202/204/205.

Not supported (answered with an error, never silently wrong): resource embedding (`select=rel(*)`, PGRST100),
aggregates, filters on embedded resources, `limit`/`order` on PATCH/DELETE, PUT, CSV/XML/GeoJSON output,
`Prefer: params=single-object`, functions with a single unnamed JSON parameter, the OpenAPI document (the root
answers a stub), `db-pre-request`, per-role settings (statement_timeout), response GUCs (`response.headers`).

Fault scripting (thread-safe): `stall_next(seconds)` answers late after the statement committed (a client
timeout then leaves a committed write behind), `drop_next()` commits and then closes the connection without an
answer; `clear_faults()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
from aiohttp import web
from psycopg import sql

from fakes.base import FakeServer, RecordedRequest

OBJECT_MEDIA = "application/vnd.pgrst.object+json"
_RESERVED = {"select", "order", "limit", "offset", "on_conflict", "columns", "apikey"}
_LOGIC = {"or", "and", "not.or", "not.and"}
_CAST_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*(\[\])*$")
_SIMPLE_OPS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "LIKE",
    "ilike": "ILIKE",
    "match": "~",
    "imatch": "~*",
    "cs": "@>",
    "cd": "<@",
    "ov": "&&",
    "sl": "<<",
    "sr": ">>",
    "nxl": "&<",
    "nxr": "&>",
    "adj": "-|-",
    "isdistinct": "IS DISTINCT FROM",
}
_QUANTIFIABLE = {"eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "match", "imatch"}
_FTS = {"fts": "to_tsquery", "plfts": "plainto_tsquery", "phfts": "phraseto_tsquery", "wfts": "websearch_to_tsquery"}


# ---- JWTs ------------------------------------------------------------------------------------------------------


def make_jwt(
    secret: str,
    role: str,
    sub: str | uuid.UUID | None = None,
    exp_in: float | None = 3600,
    aud: str | None = "authenticated",
    **claims: Any,
) -> str:
    """A Supabase-style HS256 token. API keys: `make_jwt(secret, "anon")`, `make_jwt(secret, "service_role")`;
    a signed-in user's access token: `make_jwt(secret, "authenticated", sub=user_id)`. `exp_in` seconds from now
    (negative: already expired; None: no `exp`); extra claims (email, app_metadata, ...) as keywords."""
    now = int(time.time())
    payload: dict[str, Any] = {"iss": "supabase-local", "role": role, "iat": now}
    if exp_in is not None:
        payload["exp"] = int(now + exp_in)
    if aud is not None:
        payload["aud"] = aud
    if sub is not None:
        payload["sub"] = str(sub)
        payload.setdefault("session_id", str(uuid.uuid4()))
        payload.setdefault("aal", "aal1")
        payload.setdefault("is_anonymous", False)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


# ---- errors ----------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in PostgREST's shape."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        details: Any = None,
        hint: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.hint = status, code, message, details, hint
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}


def _parse_error(message: str, details: str | None = None) -> ApiError:
    return ApiError(400, "PGRST100", message, details)


def pg_status(sqlstate: str | None, *, anonymous: bool) -> int:
    """PostgREST's mapping of a SQLSTATE to an HTTP status."""
    s = sqlstate or ""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "42883": 404,
        "42P01": 404,
        "P0001": 400,
        "53400": 500,
        "42P17": 500,
        "57P01": 503,
        "57P02": 503,
        "57P03": 503,
    }
    if s in exact:
        return exact[s]
    if s == "42501":
        return 401 if anonymous else 403
    if s.startswith("PT") and s[2:].isdigit():
        return int(s[2:])
    prefix = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 413,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return prefix.get(s[:2], 400)


def _db_error(e: psycopg.Error, *, anonymous: bool) -> ApiError:
    diag = e.diag
    status = pg_status(e.sqlstate, anonymous=anonymous)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    message = diag.message_primary or str(e).strip()
    return ApiError(status, e.sqlstate, message, diag.message_detail, diag.message_hint, headers)


# ---- query-string grammar --------------------------------------------------------------------------------------


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside parentheses and double quotes (backslash escapes inside quotes)."""
    parts, cur, depth, quoted, esc = [], [], 0, False, False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
            continue
        if quoted and ch == "\\":
            cur.append(ch)
            esc = True
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == sep:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return re.sub(r"\\(.)", r"\1", s[1:-1])
    return s


def _read_name(s: str) -> tuple[str, str]:
    """A leading (possibly double-quoted) name and the rest."""
    if s.startswith('"'):
        i, esc = 1, False
        while i < len(s):
            if esc:
                esc = False
            elif s[i] == "\\":
                esc = True
            elif s[i] == '"':
                return _unquote(s[: i + 1]), s[i + 1 :]
            i += 1
        raise _parse_error(f'failed to parse "{s}"', "unterminated quoted name")
    m = re.match(r"[^.,:()\-\"]+", s)
    if not m:
        raise _parse_error(f'failed to parse "{s}"', "expected a column name")
    return m.group(0).strip(), s[m.end() :]


@dataclass
class Field:
    name: str
    path: list[tuple[str, str]] = field(default_factory=list)  # ("->" | "->>", key)

    def sql(self) -> sql.Composable:
        expr: sql.Composable = _ident(self.name)
        for op, key in self.path:
            k = _lit(int(key)) if re.fullmatch(r"-?\d+", key) else _lit(key)
            expr = sql.SQL("({} {} {})").format(expr, sql.SQL(op), k)
        return expr

    @property
    def label(self) -> str:
        return self.path[-1][1] if self.path else self.name


def _parse_field(s: str) -> tuple[Field, str]:
    name, rest = _read_name(s.strip())
    f = Field(name)
    while rest.startswith("->"):
        op = "->>" if rest.startswith("->>") else "->"
        rest = rest[len(op) :]
        key, rest = _read_name(rest)
        f.path.append((op, key))
    return f, rest


def _parse_select(value: str) -> sql.Composable:
    items: list[sql.Composable] = []
    for raw in _split_top(value):
        raw = raw.strip()
        if not raw:
            continue
        if raw == "*":
            items.append(sql.SQL("*"))
            continue
        if re.search(r"\(", raw.replace('"(', "").replace(')"', "")) and not raw.startswith('"'):
            raise _parse_error(
                f'"{raw}": resource embedding and aggregates are not supported by the local PostgREST endpoint'
            )
        alias = None
        m = re.match(r'^("(?:[^"\\]|\\.)*"|[^:"]+):(?!:)(.*)$', raw)
        if m:
            alias, raw = _unquote(m.group(1)), m.group(2)
        f, rest = _parse_field(raw)
        cast = None
        if rest.startswith("::"):
            cast = rest[2:].strip()
            if not _CAST_RE.match(cast):
                raise _parse_error(f'invalid cast "{cast}"')
            rest = ""
        if rest.strip():
            raise _parse_error(f"failed to parse select parameter ({value})", f'unexpected "{rest}"')
        expr = f.sql()
        if cast:
            expr = sql.SQL("CAST({} AS {})").format(expr, sql.SQL(cast))
        label = alias or f.label
        items.append(sql.SQL("{} AS {}").format(expr, _ident(label)))
    return sql.SQL(", ").join(items) if items else sql.SQL("*")


def _parse_list(value: str) -> list[str]:
    if not (value.startswith("(") and value.endswith(")")):
        raise _parse_error(f"failed to parse filter (in.{value})", 'expected "(" ... ")"')
    inner = value[1:-1]
    if inner == "":
        return []
    return [_unquote(v) for v in _split_top(inner)]


def _ident(*names: str) -> sql.Composable:
    """A quoted identifier, safe inside a statement that also carries %s placeholders (a literal `%` is doubled,
    as psycopg expects when parameters are passed)."""
    return sql.SQL(sql.Identifier(*names).as_string(None).replace("%", "%%"))


def _lit(value: Any) -> sql.Composable:
    return sql.SQL(sql.Literal(value).as_string(None).replace("%", "%%"))


class _Params:
    """Bound parameters collected while composing a statement."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> sql.Composable:
        self.values.append(value)
        return sql.Placeholder()


def _filter_expr(fld: Field, op_value: str, params: _Params, context: str) -> sql.Composable:
    """`[not.]op[(mod)].value` applied to a field."""
    negate = False
    if op_value.startswith("not."):
        negate, op_value = True, op_value[4:]
    m = re.match(r"^([a-z]+)(?:\(([^)]*)\))?\.(.*)$", op_value, re.S)
    if not m:
        raise _parse_error(f"failed to parse filter ({context})", f'unexpected "{op_value}"')
    op, mod, val = m.group(1), m.group(2), m.group(3)
    col = fld.sql()
    if op in ("like", "ilike"):
        val = val.replace("*", "%")
    if op == "in":
        items = _parse_list(val)
        expr = (
            sql.SQL("false")
            if not items
            else sql.SQL("{} IN ({})").format(col, sql.SQL(", ").join(params.add(v) for v in items))
        )
    elif op == "is":
        v = val.lower()
        words = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
        if v not in words:
            raise _parse_error(f"failed to parse filter ({context})", f'unexpected "{val}" after is.')
        expr = sql.SQL("{} IS {}").format(col, sql.SQL(words[v]))
    elif op in _FTS:
        fn = sql.SQL(_FTS[op])
        if mod:
            expr = sql.SQL("{} @@ {}({}, {})").format(col, fn, params.add(mod), params.add(val))
        else:
            expr = sql.SQL("{} @@ {}({})").format(col, fn, params.add(val))
    elif op in _SIMPLE_OPS:
        if mod:
            if mod not in ("any", "all") or op not in _QUANTIFIABLE:
                raise _parse_error(f"failed to parse filter ({context})", f'unexpected modifier "{mod}"')
            values = _parse_list("(" + val[1:-1] + ")") if val.startswith("{") and val.endswith("}") else None
            if values is None:
                raise _parse_error(f"failed to parse filter ({context})", 'expected "{" ... "}"')
            if op in ("like", "ilike"):
                values = [v.replace("*", "%") for v in values]
            expr = sql.SQL("{} {} {}({})").format(
                col,
                sql.SQL(_SIMPLE_OPS[op]),
                sql.SQL(mod.upper()),
                sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(params.add(v) for v in values)),
            )
        else:
            expr = sql.SQL("{} {} {}").format(col, sql.SQL(_SIMPLE_OPS[op]), params.add(val))
    else:
        raise _parse_error(f"failed to parse filter ({context})", f'unknown operator "{op}"')
    return sql.SQL("NOT ({})").format(expr) if negate else expr


def _logic_expr(key: str, value: str, params: _Params) -> sql.Composable:
    """`or=(a.eq.1,and(b.gt.2,c.is.null))` and friends."""
    negate = key.startswith("not.")
    kind = key[4:] if negate else key
    if not (value.startswith("(") and value.endswith(")")):
        raise _parse_error(f"failed to parse logic tree ({value})", 'expected "(" ... ")"')
    parts = []
    for item in _split_top(value[1:-1]):
        item = item.strip()
        m = re.match(r"^(not\.)?(and|or)(\(.*\))$", item, re.S)
        if m:
            parts.append(_logic_expr((m.group(1) or "") + m.group(2), m.group(3), params))
            continue
        fld, rest = _parse_field(item)
        if not rest.startswith("."):
            raise _parse_error(f"failed to parse logic tree ({value})", f'unexpected "{item}"')
        parts.append(_filter_expr(fld, rest[1:], params, item))
    joined = sql.SQL(f" {kind.upper()} ").join(sql.SQL("({})").format(p) for p in parts)
    expr = sql.SQL("({})").format(joined) if parts else sql.SQL("true")
    return sql.SQL("NOT {}").format(expr) if negate else expr


def _where(query, params: _Params, skip: set[str] = frozenset()) -> sql.Composable:
    conds: list[sql.Composable] = []
    for key, value in query.items():
        if key in _RESERVED or key in skip:
            continue
        if key in _LOGIC:
            conds.append(_logic_expr(key, value, params))
            continue
        if re.search(r"\.(limit|offset|order|or|and)$", key):
            raise _parse_error(f'"{key}": filters on embedded resources are not supported')
        fld, rest = _parse_field(key)
        if rest:
            raise _parse_error(f'"{key}": filters on embedded resources are not supported')
        conds.append(_filter_expr(fld, value, params, f"{key}={value}"))
    if not conds:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(sql.SQL("({})").format(c) for c in conds)


def _order(value: str | None) -> sql.Composable:
    if not value:
        return sql.SQL("")
    terms = []
    for term in _split_top(value):
        fld, rest = _parse_field(term)
        mods = [m for m in rest.split(".") if m]
        parts: list[sql.Composable] = [fld.sql()]
        for mod in mods:
            words = {"asc": "ASC", "desc": "DESC", "nullsfirst": "NULLS FIRST", "nullslast": "NULLS LAST"}
            if mod not in words:
                raise _parse_error(f"failed to parse order ({value})", f'unexpected "{mod}"')
            parts.append(sql.SQL(words[mod]))
        terms.append(sql.SQL(" ").join(parts))
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms)


def _int_param(query, name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not re.fullmatch(r"\d+", raw):
        raise _parse_error(f"failed to parse {name} parameter ({raw})")
    return int(raw)


def _prefer(request: web.Request) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in request.headers.getall("Prefer", []):
        for item in header.split(","):
            item = item.strip()
            if not item:
                continue
            k, _, v = item.partition("=")
            prefs[k.strip()] = v.strip()
    return prefs


def _column_list(raw: str) -> list[str]:
    return [_unquote(c) for c in _split_top(raw) if c.strip()]


# ---- the server ------------------------------------------------------------------------------------------------


@dataclass
class PostgrestRequest(RecordedRequest):
    role: str | None = None
    code: str | None = None  # SQLSTATE or PGRST code of an error answer
    fault: str | None = None


@dataclass
class _Fault:
    kind: str  # "stall" | "drop"
    seconds: float = 0.0


@dataclass
class _Ctx:
    role: str
    claims: dict[str, Any]
    anonymous: bool
    schema: str
    method: str
    path: str
    headers: dict[str, str]
    prefer: dict[str, str]
    singular: bool


class LocalPostgrest(FakeServer):
    """PostgREST-compatible endpoint. `url` is what supabase-py takes as SUPABASE_URL (it appends /rest/v1).

    dsn: libpq DSN connecting as `authenticator` (e.g. `LocalPostgres.dsn_for("authenticator")`).
    jwt_secret: the HS256 secret of every key and token. api_keys: if given, the only accepted `apikey` values
    (as Supabase's gateway: the project's anon and service_role keys); else any token signed with the secret.
    """

    request_class = PostgrestRequest

    def __init__(
        self,
        dsn: str,
        jwt_secret: str,
        *,
        schemas: tuple[str, ...] = ("public",),
        extra_search_path: tuple[str, ...] = ("public", "extensions"),
        anon_role: str = "anon",
        api_keys: list[str] | None = None,
        max_rows: int | None = 1000,
        pool_size: int = 8,
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.jwt_secret = jwt_secret
        self.schemas = schemas
        self.extra_search_path = extra_search_path
        self.anon_role = anon_role
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.max_rows = max_rows
        self.pool_size = pool_size
        self._pool: list[psycopg.AsyncConnection] = []
        self.stale_connections_dropped = 0
        self._anon_key = make_jwt(jwt_secret, "anon", aud=None, exp_in=10 * 365 * 86400)
        self._service_key = make_jwt(jwt_secret, "service_role", aud=None, exp_in=10 * 365 * 86400)
        self._faults = self._fault_queue()
        self.app.router.add_route("*", "/rest/v1/rpc/{fn}", self._rpc)
        self.app.router.add_route("*", "/rest/v1/", self._root)
        self.app.router.add_route("*", "/rest/v1/{table}", self._table)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # ---- conveniences ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.http_url

    @property
    def rest_url(self) -> str:
        return f"{self.http_url}/rest/v1"

    @property
    def anon_key(self) -> str:
        """The project's anon API key (role anon, ten years)."""
        return self._anon_key

    @property
    def service_key(self) -> str:
        """The project's service_role API key (bypasses RLS)."""
        return self._service_key

    def user_token(self, sub: str | uuid.UUID, exp_in: float | None = 3600, **claims: Any) -> str:
        """A signed-in user's access token as Supabase Auth issues it (`iss` = `<project URL>/auth/v1`)."""
        claims.setdefault("iss", f"{self.http_url}/auth/v1")
        return make_jwt(self.jwt_secret, "authenticated", sub=sub, exp_in=exp_in, **claims)

    # ---- faults ------------------------------------------------------------------------------------------------

    def stall_next(self, seconds: float, times: int = 1) -> None:
        """The next `times` successful requests commit, then wait `seconds` before answering."""
        self._faults.add(_Fault("stall", seconds), times)

    def drop_next(self, times: int = 1) -> None:
        """The next `times` successful requests commit, then the connection is closed without an answer."""
        self._faults.add(_Fault("drop"), times)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.loop and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._close_pool(), self.loop)
            try:
                fut.result(5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        super().stop()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, []
        for conn in pool:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def idle_connections(self) -> int:
        return len(self._pool)

    async def _connect(self) -> psycopg.AsyncConnection:
        try:
            return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as e:
            raise ApiError(
                503, "PGRST000", "Database connection error. Retrying the connection.", str(e).strip() or None
            ) from e

    def _release(self, conn: psycopg.AsyncConnection) -> None:
        if (
            conn.closed
            or conn.broken
            or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            or len(self._pool) >= self.pool_size
        ):
            asyncio.ensure_future(conn.close())
        else:
            self._pool.append(conn)

    # ---- request plumbing --------------------------------------------------------------------------------------

    @staticmethod
    def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )

    def _error(self, rec: PostgrestRequest, err: ApiError) -> web.Response:
        rec.status, rec.code = err.status, err.code
        return self._json(err.status, err.body(), err.headers)

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request)
        return self._error(rec, ApiError(404, "PGRST125", "Invalid path specified in request URL"))

    def _authenticate(self, request: web.Request, rec: PostgrestRequest) -> tuple[str, dict[str, Any], bool]:
        apikey = request.headers.get("apikey") or request.query.get("apikey")
        if not apikey:
            raise ApiError(
                401, None, "No API key found in request", hint="No `apikey` request header or url param was found."
            )
        if self.api_keys is not None:
            valid = apikey in self.api_keys
        else:
            try:
                jwt.decode(apikey, self.jwt_secret, algorithms=["HS256"], options={"verify_aud": False})
                valid = True
            except jwt.PyJWTError:
                valid = False
        if not valid:
            raise ApiError(
                401, None, "Invalid API key", hint="Double check your Supabase `anon` or `service_role` API key."
            )
        auth = request.headers.get("Authorization")
        token = apikey
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise ApiError(
                    401,
                    "PGRST301",
                    "Authorization header is not a Bearer token",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            token = value.strip()
        try:
            claims = jwt.decode(
                token, self.jwt_secret, algorithms=["HS256"], leeway=30, options={"verify_aud": False, "require": []}
            )
        except jwt.ExpiredSignatureError as e:
            raise ApiError(
                401,
                "PGRST301",
                "JWT expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token", error_description="JWT expired"'},
            ) from e
        except jwt.InvalidSignatureError as e:
            raise ApiError(
                401,
                "PGRST301",
                "JWSError JWSInvalidSignature",
                headers={
                    "WWW-Authenticate": 'Bearer error="invalid_token", error_description="JWSError JWSInvalidSignature"'
                },
            ) from e
        except jwt.PyJWTError as e:
            raise ApiError(
                401, "PGRST301", f"JWSError ({e})", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            ) from e
        role = claims.get("role") or self.anon_role
        if not isinstance(role, str):
            raise ApiError(401, "PGRST301", "JWT role claim is not a string")
        rec.role = role
        return role, claims, role == self.anon_role

    async def _context(self, request: web.Request, rec: PostgrestRequest) -> _Ctx:
        role, claims, anonymous = self._authenticate(request, rec)
        header = "Accept-Profile" if request.method in ("GET", "HEAD") else "Content-Profile"
        schema = request.headers.get(header) or self.schemas[0]
        if schema not in self.schemas:
            raise ApiError(406, "PGRST106", f"The schema must be one of the following: {', '.join(self.schemas)}")
        accept = request.headers.get("Accept", "")
        return _Ctx(
            role=role,
            claims=claims,
            anonymous=anonymous,
            schema=schema,
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            prefer=_prefer(request),
            singular=OBJECT_MEDIA in accept,
        )

    async def _body(self, request: web.Request, rec: PostgrestRequest) -> Any:
        raw = await request.read()
        if not raw.strip():
            rec.body = None
            return None
        try:
            body = json.loads(raw)
        except ValueError as e:
            rec.body = raw.decode(errors="replace")
            raise ApiError(400, "PGRST102", "Empty or invalid json", str(e)) from e
        rec.body = body
        return body

    async def _run(self, ctx: _Ctx, work, *, read_only: bool) -> Any:
        """BEGIN; role + claims; work(cursor); COMMIT (or ROLLBACK on error / tx=rollback). Retries once on a
        fresh connection when a pooled connection turns out dead before anything ran (database restarted)."""
        for attempt in (0, 1):
            fresh = not self._pool
            conn = self._pool.pop() if self._pool else await self._connect()
            began = False
            try:
                async with conn.cursor() as cur:
                    await cur.execute(
                        b"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY"
                        if read_only
                        else b"BEGIN ISOLATION LEVEL READ COMMITTED"
                    )
                    began = True
                    search_path = ", ".join(
                        sql.Identifier(s).as_string(conn) for s in (ctx.schema, *self.extra_search_path)
                    )
                    await cur.execute(
                        "SELECT set_config('search_path', %s, true), set_config('role', %s, true), "
                        "set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true), "
                        "set_config('request.path', %s, true), set_config('request.headers', %s, true)",
                        [search_path, ctx.role, json.dumps(ctx.claims), ctx.method, ctx.path, json.dumps(ctx.headers)],
                    )
                    result = await work(cur)
                    if ctx.prefer.get("tx") == "rollback":
                        await cur.execute(b"ROLLBACK")
                    else:
                        await cur.execute(b"COMMIT")
                self._release(conn)
                return result
            except psycopg.Error as e:
                if not began and not fresh and attempt == 0 and isinstance(e, psycopg.OperationalError):
                    # A pooled connection from before a database restart (57P01 or a closed socket): nothing
                    # ran, so drop it and every other idle one, and try once on a fresh connection.
                    await conn.close()
                    self.stale_connections_dropped += 1 + len(self._pool)
                    await self._close_pool()
                    continue
                await self._rollback(conn)
                self._release(conn)
                if isinstance(e, psycopg.OperationalError) and e.sqlstate is None:
                    raise ApiError(
                        503, "PGRST001", "Database client error. Retrying the connection.", str(e).strip() or None
                    ) from e
                raise _db_error(e, anonymous=ctx.anonymous) from e
            except BaseException:
                await self._rollback(conn)
                self._release(conn)
                raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _rollback(conn: psycopg.AsyncConnection) -> None:
        if conn.broken or conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return
        try:
            await conn.execute(b"ROLLBACK")
        except psycopg.Error:
            pass

    async def _table_info(self, cur, schema: str, table: str) -> dict[str, Any]:
        await cur.execute(
            """
            select c.relkind,
              coalesce((select json_agg(json_build_object('name', a.attname,
                                                          'type', format_type(a.atttypid, a.atttypmod),
                                                          'generated', a.attgenerated <> '') order by a.attnum)
                        from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
                       '[]'::json),
              coalesce((select json_agg(a.attname order by array_position(i.indkey::int2[], a.attnum))
                        from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                        where i.indrelid = c.oid and i.indisprimary), '[]'::json)
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'v', 'm', 'f', 'p')
            """,
            [schema, table],
        )
        row = await cur.fetchone()
        if row is None:
            raise ApiError(404, "PGRST205", f"Could not find the table '{schema}.{table}' in the schema cache")
        return {"kind": row[0], "columns": {c["name"]: c for c in row[1]}, "pk": list(row[2])}

    # ---- responses -----------------------------------------------------------------------------------------------

    def _rows_response(
        self,
        ctx: _Ctx,
        status: int,
        body_text: str,
        one_text: str | None,
        n: int,
        headers: dict[str, str],
        head: bool = False,
    ) -> web.Response:
        if ctx.singular:
            return web.Response(
                status=status,
                body=None if head else (one_text or "null").encode(),
                content_type=OBJECT_MEDIA,
                charset="utf-8",
                headers=headers,
            )
        return web.Response(
            status=status,
            body=None if head else body_text.encode(),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )

    @staticmethod
    def _singular_error(n: int) -> ApiError:
        return ApiError(
            406, "PGRST116", "JSON object requested, multiple (or no) rows returned", f"The result contains {n} rows"
        )

    async def _finish(self, rec: PostgrestRequest, request: web.Request, response: web.Response) -> web.StreamResponse:
        rec.status = response.status
        fault = self._faults.take()
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "drop":
                rec.events.append("closed_by_fault")
                if request.transport is not None:
                    request.transport.abort()
                response = web.StreamResponse(status=response.status)  # nothing reaches the aborted socket
        return response

    # ---- handlers -------------------------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        rec = self.record(request)
        try:
            await self._context(request, rec)
        except ApiError as err:
            return self._error(rec, err)
        rec.status = 200
        return self._json(200, {"swagger": "2.0", "info": {"title": "local PostgREST", "version": "12"}, "paths": {}})

    async def _table(self, request: web.Request) -> web.StreamResponse:
        rec = self.record(request)
        try:
            ctx = await self._context(request, rec)
            table = request.match_info["table"]
            method = request.method
            if method in ("GET", "HEAD"):
                response = await self._select(ctx, request, table, head=method == "HEAD")
            elif method == "POST":
                response = await self._insert(ctx, request, rec, table)
            elif method == "PATCH":
                response = await self._update(ctx, request, rec, table)
            elif method == "DELETE":
                response = await self._delete(ctx, request, table)
            else:
                raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
        except ApiError as err:
            return self._error(rec, err)
        return await self._finish(rec, request, response)

    async def _select(self, ctx: _Ctx, request: web.Request, table: str, *, head: bool) -> web.Response:
        q = request.query
        params = _Params()
        select = _parse_select(q.get("select", "*"))
        where = _where(q, params)
        order = _order(q.get("order"))
        limit, offset = _int_param(q, "limit"), _int_param(q, "offset") or 0
        rng = request.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*(\d+)-(\d*)\s*", rng)
            if not m:
                raise ApiError(416, "PGRST103", "Requested range not satisfiable")
            offset = max(offset, int(m.group(1)))
            if m.group(2):
                size = int(m.group(2)) - int(m.group(1)) + 1
                limit = size if limit is None else min(limit, size)
        if self.max_rows is not None:
            limit = self.max_rows if limit is None else min(limit, self.max_rows)
        count_wanted = ctx.prefer.get("count") in ("exact", "planned", "estimated")
        qt = _ident(ctx.schema, table)
        page = sql.SQL("SELECT {} FROM {}{}{}").format(select, qt, where, order)
        if limit is not None:
            page += sql.SQL(" LIMIT {}").format(_lit(limit))
        if offset:
            page += sql.SQL(" OFFSET {}").format(_lit(offset))
        stmt = sql.SQL(
            "SELECT coalesce(json_agg(_r), '[]')::text, count(*), "
            "CASE WHEN count(*) = 1 THEN (json_agg(_r) -> 0)::text END FROM ({}) _r"
        ).format(page)

        async def work(cur):
            await self._table_info(cur, ctx.schema, table)
            await cur.execute(stmt, params.values)
            body, n, one = await cur.fetchone()
            total = None
            if count_wanted:
                count_params = _Params()
                await cur.execute(
                    sql.SQL("SELECT count(*) FROM {}{}").format(qt, _where(q, count_params)), count_params.values
                )
                total = (await cur.fetchone())[0]
            if ctx.singular and n != 1:
                raise self._singular_error(n)
            return body, n, one, total

        body, n, one, total = await self._run(ctx, work, read_only=True)
        total_s = "*" if total is None else str(total)
        if n == 0:
            if total and offset >= total and offset > 0:
                raise ApiError(
                    416,
                    "PGRST103",
                    "Requested range not satisfiable",
                    f"An offset of {offset} was requested, but there are only {total} rows.",
                )
            content_range = f"*/{total_s}"
        else:
            content_range = f"{offset}-{offset + n - 1}/{total_s}"
        status = 206 if total is not None and (offset > 0 or offset + n < total) and n > 0 else 200
        return self._rows_response(ctx, status, body, one, n, {"Content-Range": content_range}, head=head)

    def _wants_representation(self, ctx: _Ctx) -> bool:
        return ctx.prefer.get("return") == "representation"

    async def _mutate(
        self,
        ctx: _Ctx,
        request: web.Request,
        stmt: sql.Composable,
        params: list[Any],
        table: str,
        ok_status: int,
        minimal_status: int,
        checked: bool = False,
    ) -> web.Response:
        """Run a mutation. With return=representation it runs as `WITH pgrst_source AS (<stmt> RETURNING *)`
        and answers the `select=` of the returned rows; otherwise it runs bare (no RETURNING, so no SELECT
        policy is needed, as with PostgREST)."""
        representation = self._wants_representation(ctx) or ctx.singular
        select = _parse_select(request.query.get("select", "*"))
        strict = ctx.prefer.get("handling") == "strict"
        max_affected = ctx.prefer.get("max-affected")
        if representation:
            full = sql.SQL(
                "WITH pgrst_source AS ({} RETURNING *) "
                "SELECT coalesce(json_agg(_r), '[]')::text, count(*), "
                "CASE WHEN count(*) = 1 THEN (json_agg(_r) -> 0)::text END "
                "FROM (SELECT {} FROM pgrst_source) _r"
            ).format(stmt, select)
        else:
            full = stmt

        async def work(cur):
            if not checked:
                await self._table_info(cur, ctx.schema, table)
            await cur.execute(full, params)
            if representation:
                body, n, one = await cur.fetchone()
            else:
                body, n, one = "", max(cur.rowcount, 0), None
            if ctx.singular and n != 1:
                raise self._singular_error(n)
            if strict and max_affected is not None and max_affected.isdigit() and n > int(max_affected):
                raise ApiError(
                    400,
                    "PGRST124",
                    "Query result exceeds max-affected preference constraint",
                    f"The query affects {n} rows",
                )
            return body, n, one

        body, n, one = await self._run(ctx, work, read_only=False)
        count = str(n) if ctx.prefer.get("count") in ("exact", "planned", "estimated") else "*"
        headers = {"Content-Range": f"0-{n - 1}/{count}" if (n and representation) else f"*/{count}"}
        applied = [
            f"{k}={ctx.prefer[k]}" for k in ("return", "resolution", "missing", "count", "tx") if k in ctx.prefer
        ]
        if applied:
            headers["Preference-Applied"] = ", ".join(applied)
        if representation:
            return self._rows_response(ctx, ok_status, body, one, n, headers)
        return web.Response(status=minimal_status, headers=headers)

    async def _insert(self, ctx: _Ctx, request: web.Request, rec: PostgrestRequest, table: str) -> web.Response:
        body = await self._body(request, rec)
        q = request.query
        if body is None:
            raise ApiError(400, "PGRST102", "Empty or invalid json")
        rows = body if isinstance(body, list) else [body]
        if not all(isinstance(r, dict) for r in rows):
            raise ApiError(400, "PGRST102", "All object keys must match")
        if "columns" in q:
            columns = _column_list(q["columns"])
        else:
            columns = list(rows[0].keys()) if rows else []
            if any(set(r.keys()) != set(columns) for r in rows):
                raise ApiError(400, "PGRST102", "All object keys must match")
        missing_default = ctx.prefer.get("missing") == "default"
        resolution = ctx.prefer.get("resolution")
        on_conflict = _column_list(q["on_conflict"]) if "on_conflict" in q else None
        info = await self._run_info(ctx, table)
        for c in columns:
            if c not in info["columns"]:
                raise ApiError(400, "PGRST204", f"Could not find the '{c}' column of '{table}' in the schema cache")
        qt = _ident(ctx.schema, table)
        cols = sql.SQL(", ").join(_ident(c) for c in columns)
        params = _Params()
        if not rows:
            stmt = sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE false").format(qt, qt)
        elif not columns:
            if len(rows) != 1:
                raise ApiError(400, "PGRST102", "All object keys must match")
            stmt = sql.SQL("INSERT INTO {} DEFAULT VALUES").format(qt)
        elif missing_default:
            tuples = []
            for r in rows:
                cells = [
                    sql.SQL("(json_populate_record(NULL::{}, {}::json)).{}").format(
                        qt, params.add(json.dumps({c: r[c]})), _ident(c)
                    )
                    if c in r
                    else sql.SQL("DEFAULT")
                    for c in columns
                ]
                tuples.append(sql.SQL("({})").format(sql.SQL(", ").join(cells)))
            stmt = sql.SQL("INSERT INTO {} ({}) VALUES {}").format(qt, cols, sql.SQL(", ").join(tuples))
        else:
            stmt = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM json_populate_recordset(NULL::{}, {}::json) _").format(
                qt, cols, cols, qt, params.add(json.dumps(rows))
            )
        if resolution in ("merge-duplicates", "ignore-duplicates"):
            target = on_conflict or info["pk"]
            if not target:
                raise ApiError(
                    400, "42P10", "there is no unique or exclusion constraint matching the ON CONFLICT specification"
                )
            conflict = sql.SQL(", ").join(_ident(c) for c in target)
            updatable = [c for c in columns if not info["columns"][c]["generated"]]
            if resolution == "ignore-duplicates" or not updatable:
                stmt += sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(conflict)
            else:
                sets = sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(_ident(c), _ident(c)) for c in updatable)
                stmt += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(conflict, sets)
        elif on_conflict is not None and resolution is None:
            pass  # PostgREST ignores on_conflict without a resolution preference
        return await self._mutate(ctx, request, stmt, params.values, table, 201, 201, checked=True)

    async def _run_info(self, ctx: _Ctx, table: str) -> dict[str, Any]:
        """The table's columns/primary key, read from the catalog on every request (Supabase reloads PostgREST's
        schema cache on DDL, so a table created a moment ago is visible)."""

        async def work(cur):
            return await self._table_info(cur, ctx.schema, table)

        return await self._run(ctx, work, read_only=True)

    async def _update(self, ctx: _Ctx, request: web.Request, rec: PostgrestRequest, table: str) -> web.Response:
        body = await self._body(request, rec)
        q = request.query
        if "limit" in q or "order" in q:
            raise _parse_error("limit/order on PATCH is not supported by the local PostgREST endpoint")
        if not isinstance(body, dict):
            raise ApiError(
                400, "PGRST102", "Empty or invalid json" if body is None else "PATCH body must be a JSON object"
            )
        columns = _column_list(q["columns"]) if "columns" in q else list(body.keys())
        info = await self._run_info(ctx, table)
        for c in columns:
            if c not in info["columns"]:
                raise ApiError(400, "PGRST204", f"Could not find the '{c}' column of '{table}' in the schema cache")
        qt = _ident(ctx.schema, table)
        params = _Params()
        if not columns:
            # Nothing to set: PostgREST answers without touching a row.
            if self._wants_representation(ctx):
                return web.Response(
                    status=200,
                    body=b"[]",
                    content_type="application/json",
                    charset="utf-8",
                    headers={"Content-Range": "*/*"},
                )
            return web.Response(status=204, headers={"Content-Range": "*/*"})
        cols = sql.SQL(", ").join(_ident(c) for c in columns)
        source = params.add(json.dumps(body))
        where = _where(q, params)
        stmt = sql.SQL("UPDATE {} SET ({}) = (SELECT {} FROM json_populate_record(NULL::{}, {}::json) _){}").format(
            qt, cols, cols, qt, source, where
        )
        return await self._mutate(ctx, request, stmt, params.values, table, 200, 204, checked=True)

    async def _delete(self, ctx: _Ctx, request: web.Request, table: str) -> web.Response:
        q = request.query
        if "limit" in q or "order" in q:
            raise _parse_error("limit/order on DELETE is not supported by the local PostgREST endpoint")
        qt = _ident(ctx.schema, table)
        params = _Params()
        stmt = sql.SQL("DELETE FROM {}{}").format(qt, _where(q, params))
        return await self._mutate(ctx, request, stmt, params.values, table, 200, 204)

    # ---- rpc ---------------------------------------------------------------------------------------------------

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        rec = self.record(request)
        try:
            ctx = await self._context(request, rec)
            fn = request.match_info["fn"]
            if request.method == "POST":
                args = await self._body(request, rec)
                if args is None:
                    args = {}
                if not isinstance(args, dict):
                    raise ApiError(400, "PGRST102", "Function arguments must be a JSON object")
            elif request.method in ("GET", "HEAD"):
                args = {}
            else:
                raise ApiError(405, "PGRST101", "Only GET and POST are allowed for functions")
            response = await self._call(ctx, request, fn, args)
        except ApiError as err:
            return self._error(rec, err)
        return await self._finish(rec, request, response)

    async def _call(self, ctx: _Ctx, request: web.Request, fn: str, args: dict[str, Any]) -> web.Response:
        q = request.query
        read_only = request.method in ("GET", "HEAD")

        async def lookup(cur):
            await cur.execute(
                """
                select p.proretset, p.prorettype = 'void'::regtype, t.typtype = 'c' or p.prorettype = 'record'::regtype,
                       p.pronargdefaults, coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}'),
                       array(select format_type(x, null) from unnest(p.proargtypes::oid[]) with ordinality u(x, o)
                             order by o)
                from pg_proc p join pg_namespace n on n.oid = p.pronamespace join pg_type t on t.oid = p.prorettype
                where n.nspname = %s and p.proname = %s
                """,
                [ctx.schema, fn],
            )
            return await cur.fetchall()

        candidates = await self._run(ctx, lookup, read_only=True)
        chosen = None
        for retset, is_void, composite, ndefaults, names, modes, types in candidates:
            modes = modes or ["i"] * len(types)
            in_names = [n for n, m in zip(names or [""] * len(modes), modes, strict=False) if m in ("i", "b", "v")]
            if read_only:
                keys = {k for k in q.keys() if k in in_names}
                call_args = {k: q[k] for k in keys}
            else:
                keys, call_args = set(args), args
            required = set(in_names[: len(in_names) - ndefaults])
            if keys <= set(in_names) and required <= keys:
                chosen = (retset, is_void, composite, in_names, types, call_args)
                break
        if chosen is None:
            sig = ", ".join(sorted(args if not read_only else [k for k in q.keys() if k not in _RESERVED]))
            raise ApiError(
                404,
                "PGRST202",
                f"Could not find the function {ctx.schema}.{fn}({sig}) in the schema cache",
                hint="If a new function was created in the database with this name and parameters, "
                "try reloading the schema cache.",
            )
        retset, is_void, composite, in_names, types, call_args = chosen
        params = _Params()
        qfn = _ident(ctx.schema, fn)
        if call_args:
            used = [(n, t) for n, t in zip(in_names, types, strict=False) if n in call_args]
            source = sql.SQL(" FROM json_to_record({}::json) AS _args({})").format(
                params.add(json.dumps(call_args)),
                sql.SQL(", ").join(sql.SQL("{} {}").format(_ident(n), sql.SQL(t)) for n, t in used),
            )
            call = sql.SQL("{}({})").format(
                qfn, sql.SQL(", ").join(sql.SQL("{} := _args.{}").format(_ident(n), _ident(n)) for n, _ in used)
            )
        else:
            source, call = sql.SQL(""), sql.SQL("{}()").format(qfn)
        skip = set(call_args) if read_only else set()
        agg = (
            "SELECT coalesce(json_agg(_r{col}), '[]')::text, count(*), "
            "CASE WHEN count(*) = 1 THEN (json_agg(_r{col}) -> 0)::text END FROM ({{}}) _r"
        )
        if retset and composite:
            rows = (
                sql.SQL("SELECT _f.*{}, LATERAL {} _f").format(source, call)
                if call_args
                else sql.SQL("SELECT _f.* FROM {} _f").format(call)
            )
            inner = sql.SQL("SELECT {} FROM ({}) _src{}{}").format(
                _parse_select(q.get("select", "*")), rows, _where(q, params, skip), _order(q.get("order"))
            )
            limit, offset = _int_param(q, "limit"), _int_param(q, "offset")
            if limit is not None:
                inner += sql.SQL(" LIMIT {}").format(_lit(limit))
            if offset:
                inner += sql.SQL(" OFFSET {}").format(_lit(offset))
            stmt = sql.SQL(agg.format(col="")).format(inner)
        elif retset:  # a set of scalars: a JSON array of values
            rows = (
                sql.SQL("SELECT _f{}, LATERAL {} _f").format(source, call)
                if call_args
                else sql.SQL("SELECT _f FROM {} _f").format(call)
            )
            stmt = sql.SQL(agg.format(col="._f")).format(rows)
        else:  # one value (or one composite row) as JSON
            stmt = sql.SQL("SELECT _v::text, 1, _v::text FROM (SELECT to_json({}) AS _v{}) _s").format(call, source)

        async def work(cur):
            await cur.execute(stmt, params.values)
            body, n, one = await cur.fetchone()
            if ctx.singular and (retset or composite) and n != 1:
                raise self._singular_error(n)
            return body, n, one

        body, n, one = await self._run(ctx, work, read_only=read_only)
        if is_void:
            return web.Response(status=204)
        if not (retset or composite):
            return web.Response(
                status=200, body=(body or "null").encode(), content_type="application/json", charset="utf-8"
            )
        headers = {"Content-Range": f"0-{n - 1}/*" if n else "*/*"}
        return self._rows_response(ctx, 200, body, one, n, headers, head=request.method == "HEAD")
