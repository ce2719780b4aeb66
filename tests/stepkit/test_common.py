"""stepkit.common: the dataclass → command line builder every step uses, and the exit-code policy."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stepkit.common import (
    RetryableError,
    StepError,
    add_dataclass_arguments,
    dataclass_from_args,
    parse_key_values,
    run_step,
)


@dataclass(frozen=True)
class Example:
    name: str = field(metadata={"help": "a required string"})
    kind: str = field(default="a", metadata={"help": "one of a, b", "choices": ("a", "b")})
    count: int = field(default=1, metadata={"help": "an int (default %(default)s)"})
    limit: int | None = field(default=None, metadata={"help": "an optional int"})
    ratio: float = field(default=0.5, metadata={"help": "a float"})
    folder: Path | None = field(default=None, metadata={"help": "a path"})
    verbose: bool = field(default=False, metadata={"help": "off unless given"})
    wait: bool = field(default=True, metadata={"help": "on unless --no-wait"})
    tags: list[str] = field(default_factory=list, metadata={"help": "repeatable"})
    sizes: tuple[int, ...] = field(default=(), metadata={"help": "repeatable ints", "flag": "--size", "metavar": "N"})
    labels: dict[str, str] = field(default_factory=dict, metadata={"help": "KEY=VALUE; repeatable",
                                                                   "flag": "--label", "metavar": "KEY=VALUE"})


@dataclass
class Cloud:
    region: str = field(metadata={"help": "where"})
    account: str | None = field(default=None, metadata={"help": "who"})
    port: int = field(default=443, metadata={"help": "which port"})


@dataclass
class Required:
    url: list[str] = field(metadata={"help": "at least one"})


def parse(cls, argv, **kwargs):
    parser = argparse.ArgumentParser(prog="step")
    add_dataclass_arguments(parser, cls, **kwargs)
    return parser, dataclass_from_args(cls, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass():
    _, value = parse(Example, ["--name", "x"])
    assert value == Example(name="x")
    assert value.sizes == () and value.labels == {} and value.tags == []
    assert value.limit is None and value.folder is None and value.verbose is False and value.wait is True


def test_every_kind_of_field_is_parsed_and_typed():
    _, value = parse(Example, [
        "--name", "x", "--kind", "b", "--count", "3", "--limit", "7", "--ratio", "0.25", "--folder", "out/dir",
        "--verbose", "--no-wait", "--tags", "t1", "--tags", "t2", "--size", "4", "--size", "5",
        "--label", "a=b", "--label", " c = d=e ",
    ])
    assert value == Example(name="x", kind="b", count=3, limit=7, ratio=0.25, folder=Path("out/dir"), verbose=True,
                            wait=False, tags=["t1", "t2"], sizes=(4, 5), labels={"a": "b", "c": "d=e"})
    assert type(value.count) is int and type(value.ratio) is float and isinstance(value.folder, Path)


def test_bool_fields_are_switches():
    parser, _ = parse(Example, ["--name", "x"])
    assert parse(Example, ["--name", "x", "--wait"])[1].wait is True
    help_text = parser.format_help()
    assert "--verbose " in help_text and "--no-verbose" not in help_text  # a False default only turns on
    assert "--wait, --no-wait" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "x", "--verbose", "yes"])


def test_choices_and_types_are_checked_by_argparse(capsys):
    parser, _ = parse(Example, ["--name", "x"])
    for argv, message in [(["--kind", "c"], "invalid choice: 'c'"), (["--count", "two"], "invalid int value: 'two'"),
                          (["--size", "1.5"], "invalid int value: '1.5'"), ([], "required: --name")]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--name", "x", *argv] if argv else argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_help_texts_flags_and_metavars():
    parser, _ = parse(Example, ["--name", "x"])
    help_text = " ".join(parser.format_help().split())
    assert "--count COUNT an int (default 1)" in help_text
    assert "--label KEY=VALUE KEY=VALUE; repeatable" in help_text
    assert "--size N repeatable ints" in help_text
    assert "--kind {a,b} one of a, b" in help_text


def test_required_repeatable_field():
    assert parse(Required, ["--url", "u1", "--url", "u2"])[1] == Required(["u1", "u2"])
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Required)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_bad_key_value_is_a_step_error_naming_the_flag():
    with pytest.raises(StepError, match="--label: expected KEY=VALUE, got 'novalue'"):
        parse(Example, ["--name", "x", "--label", "novalue"])
    with pytest.raises(StepError, match="--pair: expected KEY=VALUE, got '=v'"):
        parse_key_values(["=v"], "--pair")
    assert parse_key_values(["a=1", "a=2", "b="], "--pair") == {"a": "2", "b": ""}


def test_environment_variables_provide_defaults(monkeypatch):
    env = {"region": "CLOUD_REGION", "account": "CLOUD_ACCOUNT", "port": "CLOUD_PORT"}
    monkeypatch.delenv("CLOUD_ACCOUNT", raising=False)
    monkeypatch.delenv("CLOUD_PORT", raising=False)
    monkeypatch.setenv("CLOUD_REGION", "westeurope")
    parser, value = parse(Cloud, [], env=env)  # --region is satisfied by the environment
    assert value == Cloud(region="westeurope", account=None, port=443)
    help_text = " ".join(parser.format_help().split())
    assert "where (default: $CLOUD_REGION)" in help_text and "who (or $CLOUD_ACCOUNT)" in help_text

    monkeypatch.setenv("CLOUD_PORT", "8443")
    assert parse(Cloud, [], env=env)[1].port == 8443
    assert parse(Cloud, ["--region", "eastus", "--port", "1"], env=env)[1] == Cloud("eastus", None, 1)

    monkeypatch.delenv("CLOUD_REGION")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Cloud, env=env)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_argument_groups_and_several_dataclasses_share_a_parser():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Required)
    add_dataclass_arguments(parser.add_argument_group("cloud"), Cloud)
    args = parser.parse_args(["--url", "u", "--region", "r"])
    assert dataclass_from_args(Required, args) == Required(["u"])
    assert dataclass_from_args(Cloud, args) == Cloud("r")


def test_mistakes_in_a_config_class_fail_when_the_parser_is_built():
    @dataclass
    class Typo:
        x: int = field(default=1, metadata={"hlep": "typo"})

    @dataclass
    class PrefilledList:
        items: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "cannot be repeated onto"})

    @dataclass
    class Unsupported:
        when: complex = field(default=0j, metadata={"help": "no command-line form"})

    for cls, message in [(Typo, "unknown metadata"), (PrefilledList, "must default to empty"),
                         (Unsupported, "no command-line form")]:
        with pytest.raises(TypeError, match=message):
            add_dataclass_arguments(argparse.ArgumentParser(), cls)


@pytest.mark.parametrize(("error", "code"), [
    (None, 0),
    (RetryableError("the registry answered 503 after 5 attempts"), 1),
    (StepError("--count: 0 is out of range"), 2),
])
def test_run_step_exit_codes(error, code, capsys):
    def main(argv):
        if error:
            raise error
        return 0

    assert run_step(main, []) == code
    err = capsys.readouterr().err.strip()
    assert err == ("" if error is None else f"error: {error}")
