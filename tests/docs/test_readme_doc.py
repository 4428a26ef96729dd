"""The README test's own rules: parsing blocks and annotations, and what output matches what is shown."""

from __future__ import annotations

import pytest

from tests.docs import readme_doc as doc

SAMPLE = """Intro.

<!-- readme-test: vary: (?<=epoch )\\d+ -->
<!-- readme-test: retry 5: settles -->
```console
$ lb group describe billing   # a comment
group billing: stable, epoch 4
$ python - <<'PY'
print("$ not a command")
PY
done
```

```toml
[log]
```
"""


def test_blocks_carry_their_annotations_and_commands_their_output() -> None:
    console, toml = doc.parse_blocks(SAMPLE)
    assert (console.lang, console.line, toml.lang) == ("console", 5, "toml")
    assert console.directives.vary == [r"(?<=epoch )\d+"] and console.directives.retry_s == 5
    assert toml.directives.notes == []
    first, second = doc.parse_console(console)
    assert first.expected == ["group billing: stable, epoch 4"]
    assert second.text.endswith("PY") and second.expected == ["done"]


def test_an_unknown_or_stray_annotation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown readme-test annotation"):
        doc.parse_blocks("<!-- readme-test: sometimes -->\n```console\n$ true\n```\n")
    with pytest.raises(ValueError, match="right before a fenced block"):
        doc.parse_blocks("<!-- readme-test: skip: why -->\nprose\n```console\n$ true\n```\n")


def test_output_matches_exactly_but_for_spaces_ellipses_and_vary_patterns() -> None:
    assert doc.lines_match(["a  b", "c"], ["a b", "c", ""], [])
    assert not doc.lines_match(["a b"], ["a b", "extra"], [])
    assert not doc.lines_match(["epoch 4"], ["epoch 5"], [])
    assert doc.lines_match(["epoch 4"], ["epoch 17"], [r"(?<=epoch )\d+"])
    assert not doc.lines_match(["epoch 4 of 3"], ["epoch 17 of 4"], [r"(?<=epoch )\d+"])
    assert doc.lines_match(["took ...s", "...", "end"], ["took 3.2s", "x", "y", "end"], [])
    assert not doc.lines_match(["...", "end"], ["end", "more"], [])


def test_any_order_needs_each_shown_line_once() -> None:
    assert doc.lines_match(["a", "b"], ["b", "a"], [], any_order=True)
    assert not doc.lines_match(["a", "a"], ["a", "b"], [], any_order=True)
    assert doc.lines_match(["x-1", "x-2"], ["x-2", "x-9"], [r"(?<=x-)1"], any_order=True)


def test_make_run_ports_move_to_the_same_broker_of_the_test_cluster() -> None:
    text = "127.0.0.1:9092,127.0.0.1:9094 localhost:9193 127.0.0.1:9293 127.0.0.1:9500"
    moved = "127.0.0.1:30000,127.0.0.1:30002 localhost:30101 127.0.0.1:30201 127.0.0.1:9500"
    assert doc.rewrite_ports(text, 30000) == moved
