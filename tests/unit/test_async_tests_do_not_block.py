"""Async tests never block the event loop with the suite's synchronous helpers.

While an async test waits synchronously (``time.sleep``, ``wait_until``, a blocking HTTP
or Redis query), its open WebSockets cannot answer pings or read; on a slower machine
(``WSBRIDGE_TEST_TIMEOUT_SCALE``) that pushes them past the ping timeout. The async
equivalents are ``asyncio.sleep``, ``eventually``, ``Appliance.aget``/``http_aget``,
``RedisServer.acommand``/``aconnected_clients``, and ``asyncio.to_thread`` for process control.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKING_FUNCTIONS = {"wait_until", "http_get", "urlopen"}
#: RedisServer's queries, time.sleep, and Appliance/RedisServer.start (which polls until the process answers).
BLOCKING_METHODS = {"connected_clients", "command", "sleep", "start"}


def _blocking_call(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name) and func.id in BLOCKING_FUNCTIONS:
        return func.id
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    if func.attr in BLOCKING_FUNCTIONS or (func.attr in BLOCKING_METHODS and owner not in (None, "asyncio")):
        return f"{owner or '...'}.{func.attr}"
    # Appliance.get("/path"): synchronous HTTP (dict.get never takes a path).
    first = node.args[0] if node.args else None
    if func.attr == "get" and isinstance(first, ast.Constant) and str(first.value).startswith("/"):
        return f"{owner or '...'}.get({first.value!r})"
    return None


def _blocking_calls_in_async_functions(source: ast.Module, where: str = "") -> set[str]:
    found = set()  # A set: nested async functions are walked twice.
    for function in ast.walk(source):
        if isinstance(function, ast.AsyncFunctionDef):
            awaited = {id(node.value) for node in ast.walk(function) if isinstance(node, ast.Await)}
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and id(node) not in awaited and (name := _blocking_call(node)):
                    found.add(f"{where}:{node.lineno}: {name}")
    return found


def test_no_async_test_or_helper_calls_a_blocking_helper():
    found = sorted(
        hit
        for path in (ROOT / "tests").rglob("*.py")
        for hit in _blocking_calls_in_async_functions(ast.parse(path.read_text()), str(path.relative_to(ROOT)))
    )
    assert not found, "blocking calls inside async functions:\n" + "\n".join(found)


def test_the_check_recognises_blocking_calls():
    source = ast.parse(
        "async def t(app, redis_server):\n"
        "    time.sleep(1)\n"
        "    wait_until(lambda: app.get('/readyz')[0] == 200)\n"
        "    redis_server.command('FLUSHALL')\n"
        "    app.start()\n"
        "    await asyncio.sleep(1)\n"
        "    await asyncio.to_thread(app.start)\n"
        "    threading.Thread(target=print).start()\n"
        "    {}.get('key')\n"
        "    await broker.start()\n"
        "    await http.get('/api/v1/clients')\n"
    )
    assert sorted(hit.split(": ", 1)[1] for hit in _blocking_calls_in_async_functions(source)) == [
        "app.get('/readyz')",
        "app.start",
        "redis_server.command",
        "time.sleep",
        "wait_until",
    ]
