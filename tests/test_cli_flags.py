"""llama.cpp's flag names as aliases, one meaning per short flag, --help that fits a screen, the prompt
from -p or -f, --chat-template FILE, info --list-presets, and messages that name the real problem."""

from __future__ import annotations

import json

import pytest
import typer

from llmrun.cli.app import COMMANDS, app, run

# command -> (long form, its aliases): each alias must reach the same parameter as its long form.
ALIASES = {
    "generate": [
        ("--model", "-m"), ("--prompt", "-p"), ("--file", "-f"), ("--max-new-tokens", "-n"), ("--ctx-size", "-c"),
        ("--threads", "-t"), ("--seed", "-s"), ("--temperature", "--temp"),
        ("--repetition-penalty", "--repeat-penalty"), ("--top-k",), ("--top-p",), ("--min-p",),
    ],
    "chat": [
        ("--model", "-m"), ("--max-new-tokens", "-n"), ("--ctx-size", "-c"), ("--threads", "-t"), ("--seed", "-s"),
        ("--temperature", "--temp"), ("--repetition-penalty", "--repeat-penalty"), ("--top-k",), ("--top-p",),
        ("--min-p",), ("--chat-template",),
    ],
    "perplexity": [("--model", "-m"), ("--context", "--ctx-size", "-c"), ("--threads", "-t"), ("--file", "-f")],
    "bench": [
        ("--model", "-m"), ("--n-prompt", "-p"), ("--n-gen", "-n"), ("--batch", "-b"), ("--threads", "-t"),
        ("--ctx-size", "-c"), ("--repetitions", "-r"), ("--format", "-o"),
    ],
    "profile": [
        ("--model", "-m"), ("--prompt-len", "-p"), ("--batch", "-b"), ("--threads", "-t"), ("--seed", "-s"),
        ("--repeats", "-r"), ("--format", "-o"),
    ],
    "info": [("--model", "-m"), ("--random-weights",), ("--list-presets",)],
}  # fmt: skip
# What each short flag means wherever it exists: one meaning across the commands.
SHORT_FLAGS = {"-m": "model", "-t": "threads", "-c": "ctx", "-s": "seed", "-o": "format", "-r": "repe", "-b": "batch"}


def _options(command: str) -> dict[str, object]:
    click_command = typer.main.get_command(app).commands[command]
    return {opt: param for param in click_command.params for opt in param.opts}


@pytest.mark.parametrize("command", ALIASES)
def test_each_alias_reaches_the_parameter_of_its_long_form(command):
    options = _options(command)
    for names in ALIASES[command]:
        assert all(name in options for name in names), (command, names)
        assert len({options[name].name for name in names}) == 1, (command, names)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_short_flag_means_one_thing_in_every_command(command):
    for flag, param in _options(command).items():
        if flag in SHORT_FLAGS:
            assert SHORT_FLAGS[flag] in param.name or SHORT_FLAGS[flag] in "".join(param.opts), (command, flag)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_a_screen_with_examples_and_no_python_types(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    options = out.partition("Examples:")[0].splitlines()  # examples are commands to copy, kept whole
    assert len(lines) <= 50 and max(map(len, options)) <= 100, (command, len(lines))
    assert "Examples:" in out
    for leak in ("<str>", "<int>", "<float>", "<bool>", "<path>", "list[", "[default: ("):
        assert leak not in out, (command, leak)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from badinputs import build_model

    return build_model(tmp_path_factory.mktemp("flags") / "tiny")


def _generate(capsys, tiny, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(["generate", "-m", str(tiny), "--device", "cpu", "-n", "3", "--temp", "0", "--json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_prompt_as_argument_option_or_file_is_the_same(capsys, tiny, tmp_path):
    (tmp_path / "prompt.txt").write_text("hello there", encoding="utf-8")
    results = []
    for args in (["hello there"], ["-p", "hello there"], ["-f", str(tmp_path / "prompt.txt")]):
        code, out, err = _generate(capsys, tiny, *args)
        assert code == 0, err
        results.append(json.loads(out)["tokens"])
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", r"-f .*missing\.txt does not exist; check the path"),
        (lambda d: d, r"-f .* is a directory, not a text file"),
        (lambda d: _write(d / "latin1.txt", b"caf\xe9"), r"-f .*latin1\.txt is not a UTF-8 text file \(byte 3\)"),
    ],
)
def test_a_bad_prompt_file_names_the_file_and_the_problem(capsys, tiny, tmp_path, make, message):
    import re

    code, out, err = _generate(capsys, tiny, "-f", str(make(tmp_path)))
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(message, err), err
    assert "Error" not in err


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_prompt_given_twice_is_refused(capsys, tiny):
    code, _, err = _generate(capsys, tiny, "hi", "-p", "hello")
    assert code == 2 and "the prompt is given twice (PROMPT and -p)" in err


def test_chat_template_file(capsys, tiny, tmp_path):
    from badinputs import CHATML

    code, out, _ = _generate(capsys, tiny, "hi", "--chat")
    own = json.loads(out)["prompt_tokens"]
    config_path = tiny.parent / "no-template"
    if not config_path.exists():
        import shutil

        shutil.copytree(tiny, config_path)
        config = json.loads((config_path / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (config_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    code, _, err = _generate(capsys, config_path, "hi", "--system", "Be brief.")
    assert code == 2 and "--system needs a chat template" in err and "--chat-template FILE" in err
    code, out, err = _generate(capsys, config_path, "hi", "--chat", "--chat-template", str(template))
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == own  # the same template from a file: the same prompt
    template.write_text("{% for m in messages %}", encoding="utf-8")
    code, _, err = _generate(capsys, config_path, "hi", "--chat-template", str(template))
    assert code == 2 and f"The chat template {template} has a syntax error on line 1" in err


def test_info_lists_presets_and_takes_random_weights(capsys):
    assert run(["info", "--list-presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert {"model", "parameters", "layers", "hub_id"} <= set(presets[0])
    assert "preset:smollm2-135m" in {p["model"] for p in presets}
    assert run(["info", "--list-presets"]) == 0
    assert "preset:llama-3.1-8b" in capsys.readouterr().out
    args = ["info", "-m", "preset:smollm2-135m", "--device", "cpu", "--json", "--random-weights"]
    assert run([*args, "--prompt-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 30


def test_perplexity_takes_the_file_as_f(capsys, tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello there " * 20, encoding="utf-8")
    base = ["perplexity", "-m", str(tiny), "--device", "cpu", "-c", "16", "--json"]
    assert run([*base, str(text)]) == 0
    by_argument = json.loads(capsys.readouterr().out)["perplexity"]
    assert run([*base, "-f", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == by_argument
    assert run([*base, "-f", str(tmp_path)]) == 2
    assert "is a directory, not a text file" in capsys.readouterr().err
