"""meshwright.errors.first_line: the one line of a multi-line library error that the CLI and the checkpoint,
trainer, safetensors and tokenizer errors print."""

from meshwright.errors import first_line


def test_first_line_takes_the_first_non_blank_line_cut_to_the_limit():
    exc = RuntimeError("\n  [../gloo/pair.cc:1] Connection reset by peer. Try again\nframe #0 ...\n")
    assert first_line(exc) == "[../gloo/pair.cc:1] Connection reset by peer. Try again"
    assert first_line(exc, 19) == "[../gloo/pair.cc:1]"


def test_an_empty_message_gives_the_type_name_or_the_default():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(""), default="") == ""
    assert first_line(ValueError("   "), 3) == "Val"
