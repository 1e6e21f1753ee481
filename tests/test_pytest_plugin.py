"""The pytest plugin, exercised in a pytest run of its own (pytester)."""

from __future__ import annotations

LEAKY = '''
import gevent, geventctx, pytest
from gevent.event import Event

forever = Event()

def background_job():
    forever.wait()

@pytest.mark.geventctx_leakcheck
def test_leaks_a_child():
    geventctx.spawn(background_job)  # LEAK-SITE

@pytest.mark.geventctx_leakcheck
def test_clean():
    geventctx.spawn(lambda: None).join()

def test_unchecked_leak():
    geventctx.spawn(gevent.sleep, 0.05)
'''


def test_leakcheck_names_the_leaked_childs_function_and_site(pytester):
    path = pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)  # a teardown error counts on top of the pass
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "LEAK-SITE" in text)
    result.stdout.fnmatch_lines(
        [f"*child background_job spawned at {path}:{line}*", "*ERROR*test_leaks_a_child*"]
    )


def test_ini_option_checks_every_test(pytester):
    pytester.makeini("[pytest]\ngeventctx_leakcheck = true\n")
    pytester.makepyfile(test_leaky=LEAKY.replace("gevent.sleep, 0.05", "forever.wait"))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)


def test_unfinished_request_scope_is_reported(pytester):
    pytester.makepyfile(
        test_scope='''
import geventctx, pytest

@pytest.mark.geventctx_leakcheck
def test_forgets_to_finish():
    geventctx.Scope("GET /forgotten")
'''
    )
    # A scope nobody references is collected; keep this one alive.
    pytester.makeconftest("import geventctx\nKEEP = []\n_orig = geventctx.Scope.__init__\n"
                          "def _init(self, *a, **k):\n    _orig(self, *a, **k)\n    KEEP.append(self)\n"
                          "geventctx.Scope.__init__ = _init\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*request scope <Scope 'GET /forgotten'*never finished*"])


def test_strict_switch_turns_late_session_writes_into_errors(pytester):
    pytester.makepyfile(
        test_warn='''
import warnings, geventctx

def test_late_write():
    warnings.warn("late", geventctx.SessionMutationWarning)
'''
    )
    assert pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider").ret == 0
    strict = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--geventctx-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*SessionMutationWarning: late*"])


def test_gevent_server_fixture_serves_on_loopback(gevent_server):
    from httpkit import request

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REMOTE_ADDR"].encode()]

    server = gevent_server(app)
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert request(server.port, "GET", "/").body == b"127.0.0.1"
