"""monitoring.metrics.Monitor: what /metrics shows and when the alerts fire (no server, no engines)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from monitoring.metrics import MIN_WINDOW_TURNS, Monitor
from vocabulary.records import SessionSummary, TurnRecord, Usage

RULES = Path(__file__).resolve().parent.parent / "monitoring" / "alert_rules.yml"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self, name: str):
        self.name = name


class FakeRecorder:
    """The attributes of storage.outbox.Recorder that /metrics reads."""

    def __init__(self):
        self.pending, self.dead, self.written, self.failures = 0, 0, 0, 0
        self.sink = Sink("sqlite")


def scrape(monitor: Monitor) -> dict[tuple[str, frozenset], float]:
    body, content_type = monitor.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def turn(v2v_ms=800.0, *, stt=150.0, llm=300.0, tts=120.0, interrupted=False, error=None) -> TurnRecord:
    return TurnRecord(
        index=0,
        vad_stop_ms=500.0,
        stt_ms=stt,
        turn_end_ms=500.0,
        llm_first_token_ms=llm,
        first_sentence_ms=50.0,
        tts_first_audio_ms=tts,
        voice_to_voice_ms=v2v_ms,
        interrupted=interrupted,
        user_text_chars=20,
        bot_text_chars=40,
        usage=Usage(llm_input_tokens=50, llm_output_tokens=20, tts_characters=60),
        error_code=error,
        user_stopped_at=None,
        first_audio_at=None,
        ended_at=None,
    )


def summary(stt_seconds=2.5, llm_input_tokens=120, llm_output_tokens=40, tts_characters=200) -> SessionSummary:
    return SessionSummary(
        stt_seconds=stt_seconds,
        stt_latency_ms=150.0,
        llm_latency_ms=300.0,
        tts_latency_ms=120.0,
        total_latency_ms=800.0,
        p50_latency_ms=800.0,
        p95_latency_ms=900.0,
        interruptions=0,
        errors=0,
        usage=Usage(
            llm_input_tokens=llm_input_tokens, llm_output_tokens=llm_output_tokens, tts_characters=tts_characters
        ),
        turn_records=(turn(),),
    )


@pytest.fixture
def logs():
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="INFO")
    yield lines
    logger.remove(sink_id)


def alert_lines(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if f"ALERT {name} " in line]


# --- metrics -----------------------------------------------------------------------------------------


def test_active_sessions_and_session_counters():
    m = Monitor(Settings())
    m.session_started("websocket")
    m.session_started("websocket")
    m.session_started("twilio")
    s = scrape(m)
    assert value(s, "atlas_active_sessions", transport="websocket") == 2
    assert value(s, "atlas_active_sessions", transport="twilio") == 1
    assert value(s, "atlas_active_sessions", transport="daily") == 0

    m.session_ended("websocket", "client_end", summary(), 0.01)
    m.session_ended("twilio", "idle_timeout", summary(), 0.01)
    s = scrape(m)
    assert value(s, "atlas_active_sessions", transport="websocket") == 1
    assert value(s, "atlas_active_sessions", transport="twilio") == 0
    assert value(s, "atlas_sessions_started_total", transport="websocket") == 2
    assert value(s, "atlas_sessions_ended_total", transport="websocket", end_reason="client_end") == 1
    assert value(s, "atlas_sessions_ended_total", transport="twilio", end_reason="idle_timeout") == 1


def test_unmatched_session_end_never_makes_the_gauge_negative():
    m = Monitor(Settings())
    m.session_ended("daily", "error", summary(), 0.0)
    s = scrape(m)
    assert value(s, "atlas_active_sessions", transport="daily") == 0
    assert value(s, "atlas_sessions_ended_total", transport="daily", end_reason="error") == 1


def test_stage_histograms_in_seconds_and_turn_counters():
    m = Monitor(Settings())
    m.turn_recorded("websocket", turn(1200.0, stt=200.0, llm=400.0, tts=100.0))
    m.turn_recorded("websocket", turn(800.0, stt=100.0, llm=300.0, tts=None, interrupted=True))
    m.turn_recorded("websocket", turn(None, stt=None, llm=None, tts=None, error="LLM_UNAVAILABLE"))
    m.turn_recorded("twilio", turn(2000.0))
    s = scrape(m)

    def hist(stage, transport="websocket"):
        return (
            value(s, "atlas_stage_latency_seconds_count", stage=stage, transport=transport),
            value(s, "atlas_stage_latency_seconds_sum", stage=stage, transport=transport),
        )

    assert hist("voice_to_voice") == (2, pytest.approx(2.0))
    assert hist("stt") == (2, pytest.approx(0.3))
    assert hist("llm_ttfb") == (2, pytest.approx(0.7))
    assert hist("tts_ttfa") == (1, pytest.approx(0.1))  # None: the turn never reached the stage
    assert hist("voice_to_voice", "twilio") == (1, pytest.approx(2.0))
    # cumulative buckets: 0.8 s and 1.2 s are both <= 1.5 s, only 0.8 s is <= 1 s
    assert value(s, "atlas_stage_latency_seconds_bucket", stage="voice_to_voice", transport="websocket", le="1.0") == 1
    assert value(s, "atlas_stage_latency_seconds_bucket", stage="voice_to_voice", transport="websocket", le="1.5") == 2
    assert value(s, "atlas_turns_total", transport="websocket") == 3
    assert value(s, "atlas_turns_total", transport="twilio") == 1
    assert value(s, "atlas_interruptions_total", transport="websocket") == 1
    assert value(s, "atlas_turns_errored_total", transport="websocket") == 1
    assert value(s, "atlas_turns_errored_total", transport="twilio") == 0


def test_errors_by_code():
    m = Monitor(Settings())
    for code in ("INVALID_JSON", "INVALID_JSON", "TTS_FALLBACK"):
        m.error(code)
    s = scrape(m)
    assert value(s, "atlas_errors_total", code="INVALID_JSON") == 2
    assert value(s, "atlas_errors_total", code="TTS_FALLBACK") == 1


def test_cost_and_usage_from_ended_sessions():
    m = Monitor(Settings())
    for cost in (0.02, 0.10, 0.03):
        m.session_started("websocket")
        m.session_ended(
            "websocket",
            "client_end",
            summary(stt_seconds=2.5, llm_input_tokens=100, llm_output_tokens=30, tts_characters=200),
            cost,
        )
    s = scrape(m)
    assert value(s, "atlas_cost_usd_total") == pytest.approx(0.15)
    assert value(s, "atlas_session_cost_usd_count") == 3
    assert value(s, "atlas_session_cost_usd_sum") == pytest.approx(0.15)
    assert value(s, "atlas_session_cost_usd_bucket", le="0.05") == 2
    assert value(s, "atlas_stt_audio_seconds_total") == pytest.approx(7.5)
    assert value(s, "atlas_llm_input_tokens_total") == 300
    assert value(s, "atlas_llm_output_tokens_total") == 90
    assert value(s, "atlas_tts_characters_total") == 600


def test_outbox_numbers_are_read_at_scrape_time():
    m = Monitor(Settings())
    assert not any(name.startswith("atlas_outbox") for name, _ in scrape(m))  # nothing attached yet
    rec = FakeRecorder()
    m.attach_recorder(rec)
    rec.pending, rec.dead, rec.written, rec.failures = 3, 1, 10, 2
    s = scrape(m)
    assert value(s, "atlas_outbox_pending", sink="sqlite") == 3
    assert value(s, "atlas_outbox_dead", sink="sqlite") == 1
    assert value(s, "atlas_outbox_written_total", sink="sqlite") == 10
    assert value(s, "atlas_outbox_failures_total", sink="sqlite") == 2
    rec.pending, rec.written = 0, 13
    s = scrape(m)
    assert value(s, "atlas_outbox_pending", sink="sqlite") == 0
    assert value(s, "atlas_outbox_written_total", sink="sqlite") == 13


def test_two_monitors_in_one_process_do_not_collide():
    a, b = Monitor(Settings()), Monitor(Settings())
    a.session_started("websocket")
    a.error("INVALID_JSON")
    sa, sb = scrape(a), scrape(b)
    assert value(sa, "atlas_active_sessions", transport="websocket") == 1
    assert value(sb, "atlas_active_sessions", transport="websocket") == 0
    assert value(sa, "atlas_errors_total", code="INVALID_JSON") == 1
    assert value(sb, "atlas_errors_total", code="INVALID_JSON") is None


def test_thresholds_are_exported():
    m = Monitor(
        Settings(
            ATLAS_ALERT_P95_MS=1500,
            ATLAS_ALERT_ERROR_RATE=0.1,
            ATLAS_ALERT_COST_PER_SESSION_USD=0.3,
            ATLAS_ALERT_ACTIVE_SESSIONS=7,
        )
    )
    s = scrape(m)
    assert value(s, "atlas_alert_threshold", alert="p95_latency") == 1.5
    assert value(s, "atlas_alert_threshold", alert="error_rate") == 0.1
    assert value(s, "atlas_alert_threshold", alert="cost_per_session") == 0.3
    assert value(s, "atlas_alert_threshold", alert="active_sessions") == 7
    # the cost threshold is a bucket of its own, so a rule can count the sessions above it exactly
    assert value(s, "atlas_session_cost_usd_bucket", le="0.3") == 0


# --- alerts ------------------------------------------------------------------------------------------


def test_p95_alert_fires_once_then_resolves_when_the_window_expires(logs):
    clock = Clock()
    m = Monitor(Settings(alert_p95_ms=1000, alert_window_secs=60), clock=clock)
    for _ in range(MIN_WINDOW_TURNS - 1):
        m.turn_recorded("websocket", turn(3000.0))
        clock.t += 1
    assert m.active_alerts() == {}  # too few turns in the window to judge
    for _ in range(10):
        m.turn_recorded("websocket", turn(3000.0))
        clock.t += 1
    assert set(m.active_alerts()) == {"p95_latency"}
    assert "3000 ms" in m.active_alerts()["p95_latency"]
    s = scrape(m)
    assert value(s, "atlas_alert_active", alert="p95_latency") == 1
    assert value(s, "atlas_alerts_total", alert="p95_latency") == 1
    assert len(alert_lines(logs, "p95_latency")) == 1
    assert alert_lines(logs, "p95_latency")[0].startswith("WARNING ALERT p95_latency firing:")

    clock.t += 61  # every slow turn is now older than the window; a scrape alone re-evaluates
    s = scrape(m)
    assert value(s, "atlas_alert_active", alert="p95_latency") == 0
    assert m.active_alerts() == {}
    assert [line.split(":")[0] for line in alert_lines(logs, "p95_latency")] == [
        "WARNING ALERT p95_latency firing",
        "INFO ALERT p95_latency resolved",
    ]


def test_p95_alert_follows_recent_turns_only():
    clock = Clock()
    m = Monitor(Settings(alert_p95_ms=1000, alert_window_secs=60), clock=clock)
    for _ in range(6):
        m.turn_recorded("websocket", turn(400.0))
    assert m.active_alerts() == {}
    for _ in range(6):
        m.turn_recorded("websocket", turn(2500.0))
    assert "p95_latency" in m.active_alerts()
    clock.t += 30
    for _ in range(200):  # fast turns dilute the slow ones below the 5% tail
        m.turn_recorded("websocket", turn(400.0))
    assert "p95_latency" not in m.active_alerts()
    # turns without a voice-to-voice time (never answered) do not count toward p95
    clock.t += 120
    for _ in range(10):
        m.turn_recorded("websocket", turn(None))
    assert m.active_alerts() == {}


def test_error_rate_alert_uses_settings_threshold_and_window(logs):
    clock = Clock()
    m = Monitor(Settings(ATLAS_ALERT_ERROR_RATE=0.2, ATLAS_ALERT_WINDOW_SECS=100), clock=clock)
    for i in range(10):
        m.turn_recorded("twilio", turn(error="LLM_UNAVAILABLE" if i >= 8 else None))
    assert "error_rate" not in m.active_alerts()  # 2/10 = 20% is not above 20%
    m.turn_recorded("twilio", turn(error="LLM_UNAVAILABLE"))  # 3/11
    m.turn_recorded("twilio", turn(error="STT_FAILED"))  # 4/12: still firing, no second log line
    assert "error_rate" in m.active_alerts()
    assert len(alert_lines(logs, "error_rate")) == 1
    assert value(scrape(m), "atlas_alerts_total", alert="error_rate") == 1

    clock.t += 101
    for _ in range(MIN_WINDOW_TURNS):
        m.turn_recorded("twilio", turn())
    s = scrape(m)
    assert value(s, "atlas_alert_active", alert="error_rate") == 0
    assert "INFO ALERT error_rate resolved" in alert_lines(logs, "error_rate")[-1]


def test_error_rate_needs_a_minimum_of_turns():
    m = Monitor(Settings(alert_error_rate=0.05), clock=Clock())
    for _ in range(MIN_WINDOW_TURNS - 1):
        m.turn_recorded("websocket", turn(error="LLM_UNAVAILABLE"))
    assert m.active_alerts() == {}
    m.turn_recorded("websocket", turn(error="LLM_UNAVAILABLE"))
    assert "error_rate" in m.active_alerts()


def test_satisfaction_alert_counts_ratings_in_its_own_window(logs):
    clock = Clock()
    m = Monitor(
        Settings(
            ATLAS_ALERT_SATISFACTION=0.85,
            ATLAS_ALERT_SATISFACTION_WINDOW_SECS=600,
            ATLAS_ALERT_SATISFACTION_MIN_RATINGS=10,
        ),
        clock=clock,
    )
    for _ in range(8):
        m.feedback_recorded("websocket", 2)  # all unhappy, but too few ratings to judge
        clock.t += 1
    assert "satisfaction" not in m.active_alerts()
    for rating in (5, 4):
        m.feedback_recorded("websocket", rating)
    assert "2/10 ratings satisfied" in m.active_alerts()["satisfaction"]
    s = scrape(m)
    assert value(s, "atlas_feedback_total", rating="2", transport="websocket") == 8
    assert value(s, "atlas_alert_active", alert="satisfaction") == 1
    assert value(s, "atlas_alert_threshold", alert="satisfaction") == 0.85
    clock.t += 601  # the unhappy hour is over; 17 of 20 new ratings satisfied is exactly 85%: not under it
    for i in range(20):
        m.feedback_recorded("webrtc", 5 if i < 17 else 1)
    assert "satisfaction" not in m.active_alerts()
    assert [line.split(":")[0] for line in alert_lines(logs, "satisfaction")] == [
        "WARNING ALERT satisfaction firing",
        "INFO ALERT satisfaction resolved",
    ]


def test_cost_alert_per_session(logs):
    m = Monitor(Settings(alert_cost_per_session_usd=0.25))
    m.session_started("websocket")
    m.session_ended("websocket", "client_end", summary(), 0.10)
    assert m.active_alerts() == {}
    for cost in (0.40, 0.90):  # two expensive sessions in a row: one transition, one log line
        m.session_started("websocket")
        m.session_ended("websocket", "client_end", summary(), cost)
    assert "$0.9000" in m.active_alerts()["cost_per_session"]
    assert value(scrape(m), "atlas_alert_active", alert="cost_per_session") == 1
    m.session_started("websocket")
    m.session_ended("websocket", "client_end", summary(), 0.05)
    assert m.active_alerts() == {}
    m.session_started("websocket")
    m.session_ended("websocket", "client_end", summary(), 0.30)
    s = scrape(m)
    assert value(s, "atlas_alerts_total", alert="cost_per_session") == 2
    assert value(s, "atlas_alert_active", alert="cost_per_session") == 1
    assert [line.split(":")[0] for line in alert_lines(logs, "cost_per_session")] == [
        "WARNING ALERT cost_per_session firing",
        "INFO ALERT cost_per_session resolved",
        "WARNING ALERT cost_per_session firing",
    ]


def test_active_sessions_alert_counts_every_transport(logs):
    m = Monitor(Settings(alert_active_sessions=2))
    m.session_started("websocket")
    m.session_started("twilio")
    assert m.active_alerts() == {}
    m.session_started("daily")
    m.session_started("daily")
    assert "4 active sessions" in m.active_alerts()["active_sessions"]
    assert len(alert_lines(logs, "active_sessions")) == 1
    m.session_ended("daily", "client_end", summary(), 0.0)
    assert "active_sessions" in m.active_alerts()  # 3 > 2
    m.session_ended("daily", "client_end", summary(), 0.0)
    s = scrape(m)
    assert value(s, "atlas_alert_active", alert="active_sessions") == 0
    assert value(s, "atlas_alerts_total", alert="active_sessions") == 1


def test_per_event_work_stays_small():
    clock = Clock()
    m = Monitor(Settings(alert_window_secs=300), clock=clock)
    start = time.perf_counter()
    for i in range(20_000):  # ~100 sessions x a turn every 1.5 s, for 5 minutes
        clock.t += 0.015
        m.turn_recorded("websocket", turn(500.0 + (i % 97) * 10, error="X" if i % 50 == 0 else None))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.2f} s for 20k turns"
    assert len(m._window) <= 300 / 0.015 + 1


# --- alert_rules.yml ---------------------------------------------------------------------------------


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_metrics_that_exist():
    samples = scrape(Monitor(Settings()))  # a fresh process: every series a rule needs is already there
    names = {name for name, _ in samples}
    rules = _rules()
    referenced = {n for rule in rules for n in re.findall(r"\batlas_[a-z0-9_]+", rule["expr"])}
    assert referenced
    missing = referenced - names
    assert not missing, f"alert_rules.yml uses metrics /metrics does not have: {missing}"
    for rule in rules:
        for le in re.findall(r'le="([^"]+)"', rule["expr"]):
            assert any(("le", le) in labels for _, labels in samples), f"no bucket le={le}"


def test_alert_rules_match_the_default_settings_and_severities():
    s = Settings()
    rules = {rule["alert"]: rule for rule in _rules()}
    assert set(rules) == {
        "AtlasP95LatencyHigh",
        "AtlasErrorRateHigh",
        "AtlasSessionCostHigh",
        "AtlasActiveSessionsHigh",
        "AtlasSatisfactionLow",
    }
    assert {name: rule["labels"]["severity"] for name, rule in rules.items()} == {
        "AtlasP95LatencyHigh": "page",
        "AtlasErrorRateHigh": "slack",
        "AtlasSessionCostHigh": "finance",
        "AtlasActiveSessionsHigh": "scale",
        "AtlasSatisfactionLow": "product",
    }
    satisfaction = rules["AtlasSatisfactionLow"]["expr"]
    assert f"< {s.alert_satisfaction:g}\n" in satisfaction
    assert f">= {s.alert_satisfaction_min_ratings}\n" in satisfaction
    assert all(w == f"[{s.alert_satisfaction_window_secs / 3600:g}h]" for w in re.findall(r"\[\w+\]", satisfaction))
    assert f"> {s.alert_p95_ms / 1000:g}\n" in rules["AtlasP95LatencyHigh"]["expr"]
    assert f"> {s.alert_error_rate:g}\n" in rules["AtlasErrorRateHigh"]["expr"]
    assert f'le="{s.alert_cost_per_session_usd:g}"' in rules["AtlasSessionCostHigh"]["expr"]
    assert f"> {s.alert_active_sessions}\n" in rules["AtlasActiveSessionsHigh"]["expr"]
    window = f"[{s.alert_window_secs / 60:g}m]"
    for name in ("AtlasP95LatencyHigh", "AtlasErrorRateHigh", "AtlasSessionCostHigh"):
        assert window in rules[name]["expr"]
        assert all(w == window for w in re.findall(r"\[\w+\]", rules[name]["expr"]))


PROMTOOL_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # instance a: 10 turns a minute at 6 s voice-to-voice, 1 in 10 with an error, one $0.90 session
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="a",le="5.0"}', values: '0+0x20'}
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="a",le="7.5"}', values: '0+10x20'}
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="a",le="+Inf"}', values: '0+10x20'}
      - {series: 'atlas_stage_latency_seconds_count{stage="voice_to_voice",transport="websocket",instance="a"}', values: '0+10x20'}
      - {series: 'atlas_turns_total{transport="websocket",instance="a"}', values: '0+10x20'}
      - {series: 'atlas_turns_errored_total{transport="websocket",instance="a"}', values: '0+1x20'}
      - {series: 'atlas_session_cost_usd_count{instance="a"}', values: '0x6 1x14'}
      - {series: 'atlas_session_cost_usd_bucket{instance="a",le="0.5"}', values: '0x20'}
      - {series: 'atlas_active_sessions{transport="websocket",instance="a"}', values: '80x20'}
      - {series: 'atlas_active_sessions{transport="twilio",instance="a"}', values: '30x20'}
      # instance b: fast, clean, cheap, quiet
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="b",le="5.0"}', values: '0+10x20'}
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="b",le="7.5"}', values: '0+10x20'}
      - {series: 'atlas_stage_latency_seconds_bucket{stage="voice_to_voice",transport="websocket",instance="b",le="+Inf"}', values: '0+10x20'}
      - {series: 'atlas_stage_latency_seconds_count{stage="voice_to_voice",transport="websocket",instance="b"}', values: '0+10x20'}
      - {series: 'atlas_turns_total{transport="websocket",instance="b"}', values: '0+10x20'}
      - {series: 'atlas_turns_errored_total{transport="websocket",instance="b"}', values: '0x20'}
      - {series: 'atlas_session_cost_usd_count{instance="b"}', values: '0x6 1x14'}
      - {series: 'atlas_session_cost_usd_bucket{instance="b",le="0.5"}', values: '0x6 1x14'}
      - {series: 'atlas_active_sessions{transport="websocket",instance="b"}', values: '60x20'}
      # ratings: 2 a minute rated 5 everywhere; from minute 20 on instance a, 3 a minute rated 2
      - {series: 'atlas_feedback_total{rating="5",transport="websocket",instance="a"}', values: '0+2x90'}
      - {series: 'atlas_feedback_total{rating="2",transport="websocket",instance="a"}', values: '0x20 0+3x70'}
    alert_rule_test:
      - eval_time: 8m
        alertname: AtlasP95LatencyHigh
        exp_alerts: [{exp_labels: {instance: a, severity: page, notify: on-call}}]
      - eval_time: 8m
        alertname: AtlasErrorRateHigh
        exp_alerts: [{exp_labels: {instance: a, severity: slack, notify: slack}}]
      - eval_time: 8m
        alertname: AtlasSessionCostHigh
        exp_alerts: [{exp_labels: {instance: a, severity: finance, notify: finance}}]
      - eval_time: 15m
        alertname: AtlasSessionCostHigh
        exp_alerts: []
      - eval_time: 8m
        alertname: AtlasActiveSessionsHigh
        exp_alerts: [{exp_labels: {instance: a, severity: scale, notify: scale}}]
      - eval_time: 15m
        alertname: AtlasSatisfactionLow
        exp_alerts: []
      - eval_time: 40m
        alertname: AtlasSatisfactionLow
        exp_alerts: [{exp_labels: {severity: product, notify: product}}]
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_alert_rules_fire_in_prometheus(tmp_path):
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # the test compares labels; annotations are for humans
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "tests.yml").write_text(PROMTOOL_TESTS)
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(["promtool", "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
