"""The pieces of ``imagefleet generate`` and of the SSE wire format it reads."""

from __future__ import annotations

import argparse
import io

import pytest

from imagefleet import generate, sse
from imagefleet.generate import Failed, Progress, jobs_of


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(["a lighthouse", *argv])


def test_each_image_is_one_streamed_request_with_the_next_seed() -> None:
    jobs = jobs_of(args("-n", "3", "--seed", "7", "--size", "64x64", "--url", "http://h:1/"), {})
    assert [j.seed for j in jobs] == [7, 8, 9]
    assert {j.url for j in jobs} == {"http://h:1/v1/images/generations"}
    assert jobs[0].body == {
        "prompt": "a lighthouse",
        "size": "64x64",
        "output_format": "png",
        "stream": True,
        "seed": 7,
    }


def test_the_key_comes_from_the_flag_then_imagefleet_then_openai_variables() -> None:
    env = {"IMAGEFLEET_API_KEY": "a", "OPENAI_API_KEY": "b"}
    assert jobs_of(args("--api-key", "f"), env)[0].headers == {"Authorization": "Bearer f"}
    assert jobs_of(args(), env)[0].headers == {"Authorization": "Bearer a"}
    assert jobs_of(args(), {"OPENAI_API_KEY": "b"})[0].headers == {"Authorization": "Bearer b"}
    assert jobs_of(args(), {})[0].headers == {}


def test_the_default_url_is_the_local_router() -> None:
    assert jobs_of(args(), {})[0].url == "http://127.0.0.1:8000/v1/images/generations"


@pytest.mark.parametrize("argv", [("-n", "0"), ("--seed", "-1")])
def test_bad_arguments_fail_in_one_line(argv: tuple[str, ...]) -> None:
    with pytest.raises(Failed):
        jobs_of(args(*argv), {})


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_counts_steps_over_all_images() -> None:
    out = Terminal()
    bar = Progress(2, out, enabled=True)
    bar.draw()
    assert "waiting for a GPU" in out.getvalue()
    bar.update(0, 5, 10)  # the second image has not started: counted as 10 steps to go
    assert out.getvalue().rsplit("\r", 1)[-1].split("] ")[1].startswith("5/20 steps, 0/2 images")
    bar.finish(0)
    assert "10/20 steps, 1/2 images" in out.getvalue().rsplit("\r", 1)[-1]


def test_no_bar_when_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()
    Progress(1, out, enabled=True).update(0, 1, 2)
    assert out.getvalue() == ""


def test_events_and_progress_comments_read_back_as_written() -> None:
    wire = sse.progress(3, 8) + sse.event("image_generation.completed", {"size": "8x8"}, b"QUJD")
    parser = sse.Parser()
    events = [e for line in wire.decode().split("\n") for e in parser.feed(line)]
    assert events[0].progress() == (3, 8) and events[0].name is None
    (done,) = [e for e in events if e.name]
    assert done.name == "image_generation.completed"
    assert done.json() == {"type": "image_generation.completed", "size": "8x8", "b64_json": "QUJD"}


def test_other_comments_are_not_progress() -> None:
    (comment,) = list(sse.Parser().feed(": keep-alive"))
    assert comment.comment == "keep-alive" and comment.progress() is None
