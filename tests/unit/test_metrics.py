"""The appliance's own metrics, through the app's real /metrics: bounded labels, scrape-time values."""

import time

from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance import metrics
from appliance.app import create_app
from appliance.settings import Settings
from appliance.tokens.base import TokenState, TokenVersion
from appliance.tokens.env import EnvTokenStore

CONTROLLER, CLIENT = "controller-token-0123456789abcdef", "client-token-0123456789abcdef"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settings() -> Settings:
    return Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT)


def test_an_open_grace_window_is_exported_by_token_name_and_a_closed_one_is_not():
    store = EnvTokenStore(settings())
    store.load()
    now = time.time()
    states = dict(store.states)
    old = TokenVersion(1, "previous-client-token-0123456789")
    states["UNITY_CLIENT_TOKEN"] = TokenState(
        "UNITY_CLIENT_TOKEN", "client", TokenVersion(2, CLIENT), previous=old, grace_ends=now + 600
    )
    states["LLM_SECRET_TOKEN"] = TokenState(
        "LLM_SECRET_TOKEN", "controller", TokenVersion(2, CONTROLLER), previous=old, grace_ends=now - 1
    )
    store._publish(states)
    with TestClient(create_app(settings(), token_store=store)) as client:
        found = samples(client.get("/metrics").text)
    grace = {labels: v for (name, labels), v in found.items() if name == "wsbridge_token_grace_end_timestamp_seconds"}
    assert grace == {(("name", "UNITY_CLIENT_TOKEN"),): now + 600}


def test_close_codes_are_bounded_labels():
    before = samples(metrics.render().decode())
    metrics.record_close(4999, by_relay=False)  # a peer's private code
    metrics.record_close(None, by_relay=False)  # no close frame at all
    metrics.record_close(4008, by_relay=True)
    after = samples(metrics.render().decode())

    def delta(code: str, by: str) -> float:
        key = ("wsbridge_closes_total", (("by", by), ("code", code)))
        return after.get(key, 0) - before.get(key, 0)

    assert (delta("other", "peer"), delta("1005", "peer"), delta("4008", "relay")) == (1, 1, 1)
    assert not any(labels and ("code", "4999") in labels for _, labels in after)


def test_http_metrics_cover_http_routes_by_template_and_nothing_else():
    with TestClient(create_app(settings())) as client:
        client.get("/healthz")
        client.get("/no/such/page")  # a scanner's 404 creates no series
        found = samples(client.get("/metrics").text)
    paths = {dict(labels)["path"] for name, labels in found if name == "wsbridge_http_requests_total"}
    assert "/healthz" in paths and not any(p.startswith("/no/") for p in paths)
    assert any(name.startswith("process_") for name, _ in found)
    (build,) = [dict(labels) for name, labels in found if name == "wsbridge_build_info"]
    assert build["instance"] == settings().instance_id and build["broker"] == "memory"


def test_tallied_outcomes_are_exact_at_every_scrape():
    key = ("wsbridge_command_outcomes_total", (("outcome", "replied"),))
    before = samples(metrics.render().decode())[key]
    metrics.REPLIED.count += 3
    assert samples(metrics.render().decode())[key] == before + 3
    assert samples(metrics.render().decode())[key] == before + 3  # folded once, not again
    metrics.REPLIED.count += 1
    assert samples(metrics.render().decode())[key] == before + 4


def test_the_lock_free_reply_histogram_is_exposed_exactly_as_prometheus_clients():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = metrics.FastHistogram("wsbridge_reply_seconds", "Reply time.", metrics.RTT_BUCKETS, registry=ours)
    reference = Histogram("wsbridge_reply_seconds", "Reply time.", buckets=metrics.RTT_BUCKETS, registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)  # empty
    # Bucket edges exactly (le is "less or equal"), between them, beyond the last, zero.
    for value in (0.0, 0.001, 0.0010001, 0.0025, 0.3, 5.0, 30.0, 31.0, 1e9):
        reference.observe(value)
        fast.observe(value)
    assert generate_latest(ours) == generate_latest(theirs)
    assert isinstance(metrics.REPLY_SECONDS, metrics.FastHistogram)
    assert "wsbridge_reply_seconds_count" in metrics.render().decode()


def test_http_metrics_count_status_errors_duration_and_in_progress_per_route_template():
    """The same series and labels as Litestar's own middleware: a status per response, errors from 500 on."""
    from litestar import Litestar, get
    from litestar.exceptions import HTTPException
    from litestar.params import FromPath

    @get("/t/item/{name:str}", sync_to_thread=False)
    def item(name: FromPath[str]) -> str:
        time.sleep(0.002)
        if name == "broken":
            raise HTTPException(status_code=503, detail="down")
        if name == "crash":
            raise RuntimeError("bug")
        return name

    def value(found, name, **labels):
        key = (
            name,
            tuple(sorted({"app_name": "wsbridge", "method": "GET", "path": "/t/item/{name}", **labels}.items())),
        )
        return found.get(key, 0.0)

    before = samples(metrics.render().decode())
    with TestClient(Litestar([item], middleware=[metrics.http_metrics()])) as client:
        assert client.get("/t/item/a").status_code == 200
        assert client.get("/t/item/b").status_code == 200
        assert client.get("/t/item/broken").status_code == 503
        assert client.get("/t/item/crash").status_code == 500
    after = samples(metrics.render().decode())

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wsbridge_http_requests_total", status_code="200") == 2
    assert delta("wsbridge_http_requests_total", status_code="503") == 1
    assert delta("wsbridge_http_requests_total", status_code="500") == 1
    assert delta("wsbridge_http_requests_error_total", status_code="200") == 0
    assert delta("wsbridge_http_requests_error_total", status_code="503") == 1
    assert delta("wsbridge_http_requests_error_total", status_code="500") == 1
    assert delta("wsbridge_http_request_duration_seconds_count", status_code="200") == 2
    assert delta("wsbridge_http_request_duration_seconds_sum", status_code="200") >= 0.004  # both slept 2 ms
    assert delta("wsbridge_http_request_duration_seconds_bucket", status_code="200", le="0.001") == 0
    assert value(after, "wsbridge_http_requests_in_progress", status_code="200") == 0  # each one ended
