"""The REST API against its own OpenAPI schema, fuzzed by an independent tool (Schemathesis).

Schemathesis reads the schema the site serves (``/api/schema/``) and sends every operation
generated requests, valid and invalid (its examples, coverage and fuzzing phases, seeded), then
runs all of its checks on each answer: no 5xx, a documented status code, content type and
headers, a body that matches the documented schema, valid input accepted and invalid input
refused. It runs in-process over WSGI against a test database holding a small clustered
library, so the suggestion endpoints answer 200 as well as their errors; once as a logged-in
user (session cookie and CSRF token, as a browser sends them) and once anonymously.

Two checks are adjusted for the two multipart operations (POST suggestions/ and posts/), where
a schema cannot say everything: a schema-valid upload may be random bytes, rightly a 400; and
every multipart field is text, so a "wrong type" value the fuzzer sends is valid tag text.

Run it alone: ``python -m pytest tests/test_api_fuzz.py -q``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from django.apps import apps
from django.contrib import auth
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.core.handlers.wsgi import WSGIHandler
from django.core.management.color import no_style
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection
from django.middleware.csrf import CSRF_SESSION_KEY
from django.utils import timezone
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from imagetags.models import StockImage
from imagetags.services.features import compute_features
from imagetags.services.rebuild import rebuild_clusters

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

SEED = 10
# Cases per operation and generation phase: enough to reach every field's boundaries, small
# enough for the whole run (two identities, 9 operations) to stay within a few minutes.
MAX_EXAMPLES = 100
# The fuzzer's session: a fixed key (its cookie goes into the fuzzer's configuration before
# the test database exists) whose row the fixture creates, with the CSRF secret inside it
# (CSRF_USE_SESSIONS), so the fuzzer only needs to send the token header.
SESSION_KEY = "imagetagsfuzzersession0000000001"
CSRF_SECRET = "f" * 32


def fuzz_config(**extra: Any) -> schemathesis.Config:
    """Every check Schemathesis has, all of its generation phases but stateful, seeded."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            # Stateful links need OpenAPI links, which the schema does not declare.
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": True},
            "operations": [
                {
                    # A schema cannot say "a decodable image" or "an existing cluster set":
                    # schema-valid uploads of random bytes are rightly a 400.
                    "include-method": "POST",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]
                        },
                        # Every multipart field is text: the fuzzer's "wrong type" values for a
                        # tag field (the object {} sent as the text "{}", a number as "5") are
                        # valid tag input. Types of query parameters are still checked.
                        "negative_data_rejection": {"enabled": False},
                    },
                },
                {
                    # Nor "a tag name": the names in `exclude` follow the rules of every tag
                    # name (NFKC, refused character categories, a length after normalising,
                    # MAX_TAGS_PER_POST of them), which no JSON Schema pattern states exactly;
                    # a name breaking them is a 400 saying which rule (e.g. "contains U+0081 (a
                    # control character)"), as for the POST endpoints' tag fields.
                    "include-method": "GET",
                    "include-path-regex": "suggestions/$",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]
                        },
                    },
                },
            ],
            **extra,
        }
    )


class TestWSGIHandler(WSGIHandler):
    """Django's WSGI handler without closing the database connection after each request.

    The test database lives in the test's transaction, so the connection must stay open: this
    is what Django's own test client does (``django.test.client.ClientHandler``).
    """

    __test__ = False  # not a test class

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            return super().__call__(environ, start_response)
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)


# Loaded at collection: the schema is generated from the code and the settings, not the data.
SCHEMA_PATH = "/api/schema/?format=json"
session_schema = schemathesis.openapi.from_wsgi(
    SCHEMA_PATH,
    TestWSGIHandler(),
    config=fuzz_config(
        auth={"openapi": {"cookieAuth": {"api_key": SESSION_KEY}}},
        headers={"X-CSRFToken": CSRF_SECRET},
    ),
)
anonymous_schema = schemathesis.openapi.from_wsgi(
    SCHEMA_PATH, TestWSGIHandler(), config=fuzz_config()
)

# (identity, operation, status) -> cases; reported, and checked for reach, at the end.
CASES: Counter[tuple[str, str, int]] = Counter()
OPERATIONS = sorted(
    f"{result.ok().method.upper()} {result.ok().path}"
    for result in session_schema.get_all_operations()
)


@pytest.fixture(scope="module", autouse=True)
def report(request) -> Iterator[None]:
    yield
    if not CASES:
        return
    lines = [
        f"{count:5d}  {who:9s} {status} {operation}"
        for (who, operation, status), count in sorted(CASES.items())
    ]
    total = sum(CASES.values())
    server_errors = sum(n for (_, _, status), n in CASES.items() if status >= 500)
    # The fuzzer must have got past the errors: every operation answered 2xx at least once to
    # the logged-in client (the library fixture makes the suggestion endpoints answer too).
    reached = {op for (who, op, status) in CASES if who == "session" and status < 300}
    ran = {op for (who, op, _) in CASES if who == "session"}
    if set(OPERATIONS) <= ran:
        assert set(OPERATIONS) <= reached, f"never a 2xx: {sorted(set(OPERATIONS) - reached)}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(
                f"Schemathesis: {len(OPERATIONS)} operations, {total} cases, {server_errors} 5xx"
            )
            for line in lines:
                reporter.write_line(line)


@pytest.fixture
def fuzz_library(make_post, settings) -> Iterator[None]:
    """Six photos with real features, clustered: the suggestion endpoints answer 200."""
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_THROTTLE_RATE": None}
    settings.CSRF_USE_SESSIONS = True
    cache.clear()
    # Ids from 1, as on SQLite: the fuzzer's small ids then name real rows on PostgreSQL too,
    # whose sequences keep counting across the rolled-back tests before this one.
    with connection.cursor() as cursor:
        for sql in connection.ops.sequence_reset_sql(
            no_style(), apps.get_app_config("imagetags").get_models()
        ):
            cursor.execute(sql)
    for seed in range(3):
        make_post(["tomato", "red"], color=(220, 20, 20), pattern="noise", seed=seed)
        make_post(["blueberry", "blue"], color=(20, 40, 220), pattern="noise", seed=seed)
    compute_features(StockImage.objects.all())
    rebuild_clusters(k=2, algorithm="kmeans")
    yield
    cache.clear()


@pytest.fixture
def fuzzer_session(fuzz_library, django_user_model) -> None:
    """The session row behind SESSION_KEY: a logged-in user, with the CSRF secret."""
    user = django_user_model.objects.create_user("fuzzer")
    data = {
        auth.SESSION_KEY: str(user.pk),
        auth.BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
        auth.HASH_SESSION_KEY: user.get_session_auth_hash(),
        CSRF_SESSION_KEY: CSRF_SECRET,
    }
    Session.objects.create(
        session_key=SESSION_KEY,
        session_data=SessionStore().encode(data),
        expire_date=timezone.now() + timedelta(hours=1),
    )


HYPOTHESIS = hypothesis_settings(
    deadline=None,
    # One database for the whole test: the library fixture is built once per operation.
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,
)


@session_schema.parametrize()
@HYPOTHESIS
def test_api_conforms_to_its_schema_logged_in(case, fuzzer_session) -> None:
    response = case.call_and_validate()
    CASES[("session", f"{case.method} {case.path}", response.status_code)] += 1


@anonymous_schema.parametrize()
@HYPOTHESIS
def test_api_conforms_to_its_schema_anonymous(case, fuzz_library) -> None:
    response = case.call_and_validate()
    CASES[("anonymous", f"{case.method} {case.path}", response.status_code)] += 1
