"""The input formats are one registry (megatron_vl/data/format_registry.py): the tool's
--input-format choices, its --help and the README's table are the registry's names and
descriptions, and a format registered anywhere is accepted by the tool and read by its reader."""

import contextlib
import importlib.util
import io
import json
import os

import pytest

from megatron_vl.data import format_registry
from megatron_vl.data.format_registry import InputFormat, ReadOptions, format_names, input_format, register
from megatron_vl.data.indexed import IndexedDataset
from megatron_vl.data.preprocess import preprocess_files, read_meta, sidecar
from megatron_vl.data.records import DataUsageError, RawDocument
from megatron_vl.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_IN = ["mmc4", "obelics", "wds-pairs", "jsonl-text", "llava", "coco-captions", "instructpix2pix", "magicbrush"]
TABLE_HEADER = "| Format | What it reads | Flags it reads |"


def _tool(name="preprocess_data"):
    spec = importlib.util.spec_from_file_location(f"_registry_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _choices(parser, dest):
    return next(a.choices for a in parser._actions if a.dest == dest)


def expected_table():
    rows = [TABLE_HEADER, "|---|---|---|"]
    for name in format_names():
        fmt = input_format(name)
        rows.append(f"| `{name}` | {fmt.description} | {', '.join(f'`{f}`' for f in fmt.flags()) or '—'} |")
    return rows


def readme_table():
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = fh.read().splitlines()
    assert lines.count(TABLE_HEADER) == 1, f"README.md has {lines.count(TABLE_HEADER)} input-format tables"
    start = lines.index(TABLE_HEADER)
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    return lines[start:end]


@contextlib.contextmanager
def registered(fmt):
    register(fmt)
    try:
        yield fmt
    finally:
        format_registry.unregister(fmt.name)


def test_registry_names_are_the_tool_choices_and_the_readme_table():
    assert format_names() == BUILT_IN
    assert _choices(_tool().build_parser(), "input_format") == BUILT_IN
    table = expected_table()
    assert readme_table() == table, "README.md's input-format table should read:\n" + "\n".join(table)


def test_what_each_format_needs():
    assert [n for n in BUILT_IN if input_format(n).instruct] == ["llava", "coco-captions", "instructpix2pix",
                                                                 "magicbrush"]
    assert [n for n in BUILT_IN if not input_format(n).images] == ["jsonl-text"]
    assert {n: input_format(n).flags() for n in BUILT_IN} == {
        "mmc4": ["--image-root", "--min-sim"], "obelics": ["--image-root"], "wds-pairs": [],
        "jsonl-text": ["--json-keys"], "llava": ["--image-root", "--conversation-template"],
        "coco-captions": ["--image-root", "--coco-splits", "--seed", "--conversation-template"],
        "instructpix2pix": ["--conversation-template"], "magicbrush": ["--conversation-template"]}
    # Readers whose records are parsed in the workers (jsonl lines), and those that hand documents.
    assert [n for n in BUILT_IN if input_format(n).parse is not None] == ["mmc4", "jsonl-text"]


def test_every_flag_a_format_reads_is_a_flag_of_the_tool():
    options = {o for a in _tool().build_parser()._actions for o in a.option_strings}
    read = {f for n in format_names() for f in input_format(n).flags()}
    assert read == {"--image-root", "--min-sim", "--json-keys", "--coco-splits", "--seed", "--conversation-template"}
    assert read <= options


def test_help_lists_every_format_with_its_description():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _tool().build_parser().parse_args(["--help"])
    text = " ".join(out.getvalue().split())   # the epilog is wrapped
    listed = text[text.index("input formats (--input-format):"):]
    for name in BUILT_IN:
        fmt = input_format(name)
        flags = f" [{', '.join(fmt.flags())}]" if fmt.flags() else ""
        assert f" {name}: {fmt.description}{flags}" in listed


def test_unknown_format_is_one_line(tmp_path):
    with pytest.raises(DataUsageError) as info:
        preprocess_files([str(tmp_path / "x.jsonl")], str(tmp_path / "p"), "nope", "sentencepiece", "unused")
    assert str(info.value) == ("unknown input format 'nope': the formats are mmc4, obelics, wds-pairs, jsonl-text, "
                               "llava, coco-captions, instructpix2pix, magicbrush")
    assert os.listdir(tmp_path) == []   # refused before anything was written
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        _tool().main(["--input-format", "nope", "--input", "x", "--output-prefix", "y", "--tokenizer-model", "z"])
    assert exited.value.code == 2
    assert err.getvalue().splitlines()[-1].endswith(
        ": error: argument --input-format: invalid choice: 'nope' (choose from 'mmc4', 'obelics', 'wds-pairs', "
        "'jsonl-text', 'llava', 'coco-captions', 'instructpix2pix', 'magicbrush')")


def test_register_refuses_a_duplicate_a_multiline_description_and_an_unknown_option():
    def read(path, report, options):
        return iter(())
    with pytest.raises(ValueError, match="^input format 'mmc4' is already registered$"):
        register(InputFormat("mmc4", "again", read))
    with pytest.raises(ValueError, match=r"^input format two-lines: the description is one line without '\|'"):
        register(InputFormat("two-lines", "one\ntwo", read))
    with pytest.raises(ValueError, match=r"^input format odd: unknown option\(s\) \['colour'\]"):
        register(InputFormat("odd", "odd", read, options=("colour",)))
    assert format_names() == BUILT_IN


def _read_lines_as_documents(path, report, options: ReadOptions):
    """A test format: one document per line, the line's text under a prefix of the json key."""
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                yield RawDocument(f"{path}:{i}", [f"{options.json_key}: {line.strip()}"])


def test_a_registered_format_is_accepted_by_the_tool_and_read_by_its_reader(tmp_path):
    from megatron_vl.data.tokenizer import Tokenizer
    _tool("make_sample_data").train_tokenizer(str(tmp_path), ["first line", "second line", "body: a line"] * 20, 64)
    model = str(tmp_path / "tokenizer.model")
    source = tmp_path / "in.txt"
    source.write_text("first line\n\nsecond line\n")
    fmt = InputFormat("lines", "plain text, one document per line", _read_lines_as_documents, images=False,
                      options=("json_key",))
    with registered(fmt):
        assert _choices(_tool().build_parser(), "input_format") == BUILT_IN + ["lines"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run_cli(_tool().main, ["--input-format", "lines", "--input", str(source), "--json-keys", "body",
                                          "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", model,
                                          "--no-progress"])
        assert code == 0, out.getvalue()
    assert "lines" not in format_names()
    prefix = str(tmp_path / "out_body_document")   # a format reading the json key gets one dataset per key
    meta = read_meta(prefix)
    assert (meta["format"], meta["multimodal"], meta["loss_mask"], meta["num_documents"]) == ("lines", False,
                                                                                               False, 2)
    tok = Tokenizer("sentencepiece", model)
    docs = IndexedDataset(prefix)
    assert [list(map(int, docs[d])) for d in range(2)] == [tok.encode("body: first line"),
                                                          tok.encode("body: second line")]
    assert not os.path.exists(sidecar(prefix, "images") + ".idx")
    assert json.loads(open(sidecar(prefix, "meta")).read())["report"]["documents_written"] == 2
