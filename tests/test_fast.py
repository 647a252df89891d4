"""Issue 17: the `fast` extra — uvloop runs the services' loop, orjson writes hot-path JSON; both optional."""

import asyncio
import json

from gitfaas import fast


def test_run_uses_uvloop_when_installed():
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = fast.run(loop_module())
    assert module.startswith("uvloop") == (fast.LOOP == "uvloop")


def test_dumps_is_compact_json_and_falls_back_for_what_orjson_refuses():
    value = {"a": [1, "é", None, True], "b": {"c": 1.5}}
    assert json.loads(fast.dumps(value)) == value
    assert b" " not in fast.dumps(value)
    big = {"n": 2**70, 1: "int key"}
    assert json.loads(fast.dumps(big)) == {"n": 2**70, "1": "int key"}


def test_validate_accepts_and_refuses_exactly_what_loads_does():
    import pytest

    from gitfaas import safejson

    for body in [b"null", b'{"a": [1, 2]}', b"NaN", b'"\\ud800"', b"1e400", b"2" * 40, "[1]".encode("utf-16"),
                 b"\xef\xbb\xbf{}", b"{", b"[" * 101 + b"]" * 101, b"\xff", b'{"a":1,}']:
        try:
            safejson.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            with pytest.raises(type(exc)) as raised:
                safejson.validate(body)
            assert str(raised.value) == str(exc)
        else:
            safejson.validate(body)


def test_a_lone_surrogate_is_written_as_a_replacement_character_not_refused() -> None:
    """Text decoded with `surrogateescape` (a process's output, a file name) can carry one; the status or
    run document it is in is still written, as valid UTF-8 JSON any reader takes."""
    written = fast.dumps({"error": "bad byte: \udcff!", "pair": "\ud83d\ude00"})
    assert json.loads(written.decode("utf-8")) == {"error": "bad byte: \ufffd!", "pair": "\U0001F600"}
    assert fast.loads_trusted(written) == json.loads(written)
