"""Every class of bad preprocessing input: a clear message with file:line, the fail/skip policy,
and never a .bin/.idx pair that looks valid after a failed or interrupted run."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_pathmoe.data import DataError, TokenizerSpec, preprocess

REPO = Path(__file__).resolve().parents[2]
CLI = str(REPO / "tools" / "preprocess_data.py")


def write_lines(path: Path, lines: list) -> str:
    """Records are dicts (dumped as JSON), str lines or raw bytes lines."""
    with open(path, "wb") as f:
        for r in lines:
            raw = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(raw + b"\n")
    return str(path)


def _run(src, tmp_path, tokenizer, **kw) -> dict:
    return preprocess(src, str(tmp_path / "out" / "corpus"), tokenizer, quiet=True, **kw)


def _fails(src, tmp_path, tokenizer, match: str, **kw) -> str:
    with pytest.raises(DataError) as err:
        _run(src, tmp_path, tokenizer, **kw)
    message = str(err.value)
    assert match in message and "\n" not in message, message
    assert not glob.glob(str(tmp_path / "out" / "*")), "a failed run left files behind"
    return message


GOOD = {"text": "Good morrow, cousin."}


def test_malformed_json_names_file_and_line(small_docs, tokenizer, tmp_path):
    # Past the first blocks, so earlier data was already written to the temporary files.
    src = write_lines(tmp_path / "bad.jsonl", small_docs[:35] + ['{"text": "unterminated'] + small_docs[35:])
    for options in ({"workers": 1}, {"workers": 2}, {"workers": 2, "partitions": 3}):
        message = _fails(src, tmp_path, tokenizer.path, f"{src}:36: malformed JSON", block_bytes=20_000, **options)
        assert "--on-bad-record skip" in message


@pytest.mark.parametrize("record, match", [
    ({"body": "wrong field"}, "key 'text' missing (keys: body); pass the field holding the text with --json-keys"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": 42}, "key 'text' holds int, expected a string"),
    ({"text": None}, "key 'text' holds NoneType"),
    ({"text": {"nested": "x"}}, "key 'text' holds dict"),
    ({"text": ["ok", 3]}, "key 'text' holds list"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
    ('{"text": "lone surrogate \\ud800"}', "the tokenizer failed on this text"),
])
def test_bad_record_names_file_line_and_fix(record, match, tokenizer, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, record, GOOD])
    _fails(src, tmp_path, tokenizer.path, f"{src}:3: ")
    _fails(src, tmp_path, tokenizer.path, match)


def test_skip_policy_counts_and_keeps_the_good_records(tokenizer, tmp_path):
    records = [GOOD, '{"text": ', {"title": "x"}, {"text": 7}, b'{"text": "\xff"}', {"text": "Farewell."},
               {"text": "x" * 5000}]
    src = write_lines(tmp_path / "mixed.jsonl", records)
    summary = _run(src, tmp_path, tokenizer.path, on_bad_record="skip", max_document_bytes=1000)
    assert summary["bad_records"] == {"malformed JSON": 1, "missing key": 1, "not a string": 1,
                                      "invalid UTF-8": 1, "too large": 1}
    assert summary["skipped_examples"][0].startswith(f"{src}:2: malformed JSON")
    ds = IndexedDataset(summary["prefixes"]["text"])
    assert [tokenizer.detokenize(ds[i][:-1]) for i in range(len(ds))] == ["Good morrow, cousin.", "Farewell."]


def test_empty_documents_are_skipped_and_counted_under_both_policies(tokenizer, tmp_path):
    src = write_lines(tmp_path / "e.jsonl", [GOOD, {"text": ""}, "", {"text": ["", ""]}, GOOD])
    summary = _run(src, tmp_path, tokenizer.path, on_bad_record="fail")
    assert summary["documents"] == 2 and summary["empty_documents"] == 2  # the blank line is no document
    assert summary["per_key"]["text"]["first_empty"] == f"{src}:2"


def test_empty_input_file(tokenizer, tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   "])
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    _fails([good, empty], tmp_path, tokenizer.path, f"{empty}: empty input file")
    summary = _run([good, empty, blank], tmp_path, tokenizer.path, on_bad_record="skip")
    assert summary["bad_records"] == {"empty file": 2} and summary["documents"] == 1
    _fails([empty], tmp_path / "again", tokenizer.path, "no documents with text under key 'text'",
           on_bad_record="skip")


def test_huge_document_is_never_loaded(tokenizer, tmp_path):
    huge = "word " * 40_000  # 200 kB, over a 10 kB limit
    src = write_lines(tmp_path / "huge.jsonl", [GOOD, {"text": huge}, GOOD])
    _fails(src, tmp_path, tokenizer.path, f"{src}:2: document of 200", max_document_bytes=10_000)
    summary = _run(src, tmp_path / "ok", tokenizer.path, max_document_bytes=10_000, on_bad_record="skip")
    assert summary["documents"] == 2 and summary["bad_records"] == {"too large": 1}
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text(f"short one\n\n{huge}\nmore of it\n\nshort two\n")
    _fails(str(paragraphs), tmp_path, tokenizer.path, f"{paragraphs}:3: document of", input_format="text-paragraph",
           max_document_bytes=10_000)
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_text(huge)
    _fails(str(folder), tmp_path, tokenizer.path, f"{folder / 'a.txt'}:1: document of 200000 bytes",
           input_format="text-file", max_document_bytes=10_000)


def test_unknown_tokenizer_type_and_missing_tokenizer_file(small_jsonl, tmp_path):
    _fails(small_jsonl, tmp_path, TokenizerSpec("WordPieceTokenizer", "x.json"),
           "--tokenizer-type 'WordPieceTokenizer' is not supported; choose one of HuggingFaceTokenizer")
    _fails(small_jsonl, tmp_path, str(tmp_path / "missing.json"), "(from --tokenizer-model): no such file")
    _fails(small_jsonl, tmp_path, TokenizerSpec("GPT2BPETokenizer", vocab_file=str(tmp_path / "v.json"),
                                                merge_file="m.txt"), "(from --vocab-file): no such file")


def test_missing_and_truncated_input(tokenizer, tmp_path):
    _fails(str(tmp_path / "nope.jsonl"), tmp_path, tokenizer.path, "--input")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps(GOOD).encode() * 2000)[:-40])
    _fails(str(truncated), tmp_path, tokenizer.path, f"--input {str(truncated)!r}: read failed")


def test_unwritable_output_location(small_jsonl, tokenizer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"--output-prefix .*cannot create folder .*choose a writable location"):
        preprocess(small_jsonl, str(blocker / "corpus"), tokenizer.path, quiet=True)
    taken = tmp_path / "taken"
    os.makedirs(taken / "corpus_text_document.bin.tmp-{}".format(os.getpid()))  # a temp name is a folder
    with pytest.raises(DataError, match=r"--output-prefix .*cannot write"):
        preprocess(small_jsonl, str(taken / "corpus"), tokenizer.path, quiet=True)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DataError, match="not writable"):
            preprocess(small_jsonl, str(locked / "corpus"), tokenizer.path, quiet=True)


# --- interrupted runs ------------------------------------------------------------------------

def _feed_fifo(path: str, payload: bytes, done: threading.Event) -> None:
    """Write ``payload`` into the FIFO, then keep it open (no EOF) until ``done``."""
    with open(path, "wb") as fifo:
        fifo.write(payload)
        fifo.flush()
        done.wait(120)


def _default_sigint() -> None:
    # A suite launched in the background (`cmd &` without job control, nohup) ignores SIGINT,
    # and an ignored SIGINT stays ignored in children: Python then never raises
    # KeyboardInterrupt, and the Ctrl-C below would be lost (seen as a hang).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_on_fifo(tmp_path: Path, small_docs, tokenizer_path: str, prefix: str, workers: int):
    fifo = str(tmp_path / "input.jsonl")
    os.mkfifo(fifo)
    payload = "".join(json.dumps(d) + "\n" for d in small_docs).encode() * 8  # > 2 blocks of 256 kB
    done = threading.Event()
    feeder = threading.Thread(target=_feed_fifo, args=(fifo, payload, done), daemon=True)
    feeder.start()
    proc = subprocess.Popen([sys.executable, CLI, "--input", fifo, "--output-prefix", prefix, "--tokenizer-model",
                             tokenizer_path, "--append-eod", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    # Wait until tokens were written to the temporary .bin: the run is mid-way, blocked on input.
    deadline = time.monotonic() + 120
    while not any(os.path.getsize(p) for p in glob.glob(prefix + "_text_document.bin.tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)
    return proc, done


def _pairs(prefix: str) -> list[str]:
    return [p for p in glob.glob(prefix + "*") if p.endswith((".bin", ".idx"))]


def _threads_blocking_sigint(pid: int) -> dict[int, bool]:
    """Linux: thread id -> whether its signal mask blocks SIGINT."""
    bit = 1 << (signal.SIGINT - 1)
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        masks[int(tid)] = bool(int(re.search(r"SigBlk:\s*([0-9a-f]+)", status)[1], 16) & bit)
    return masks


def _communicate_or_dump_stacks(proc: subprocess.Popen, timeout: float) -> str:
    """The tool's stderr once it exits; if it hangs, fail with every thread's stack (the tool
    registers faulthandler on SIGUSR1)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(5)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no exit {timeout} s after Ctrl-C; its threads:\n{err}")


def test_ctrl_c_removes_partial_outputs_and_keeps_the_old_dataset(small_docs, small_jsonl, tokenizer, tmp_path):
    prefix = str(tmp_path / "run")
    old = preprocess(small_jsonl, prefix, tokenizer.path, quiet=True)["prefixes"]["text"]
    old_bytes = Path(old + ".bin").read_bytes(), Path(old + ".idx").read_bytes()
    proc, done = _start_on_fifo(tmp_path, small_docs, tokenizer.path, prefix, workers=2)
    workers = psutil.Process(proc.pid).children()
    # Only the main thread (blocked reading the FIFO) may take the Ctrl-C: a pool thread that
    # took it would leave the read blocked forever (a hang seen under load).
    blocking = _threads_blocking_sigint(proc.pid)
    assert not blocking.pop(proc.pid) and len(blocking) >= 3 and all(blocking.values())
    proc.send_signal(signal.SIGINT)
    err = _communicate_or_dump_stacks(proc, timeout=120)
    done.set()
    assert proc.returncode == 130 and "interrupted: partial outputs removed" in err, err
    assert sorted(_pairs(prefix)) == [old + ".bin", old + ".idx"]  # the previous dataset is untouched
    assert (Path(old + ".bin").read_bytes(), Path(old + ".idx").read_bytes()) == old_bytes
    assert not glob.glob(prefix + "*.tmp-*")
    psutil.wait_procs(workers, timeout=30)
    assert not any(w.is_running() for w in workers)


def test_kill_9_leaves_no_valid_looking_pair_and_the_next_run_cleans_up(small_docs, small_jsonl, tokenizer,
                                                                        tmp_path):
    prefix = str(tmp_path / "run")
    proc, done = _start_on_fifo(tmp_path, small_docs, tokenizer.path, prefix, workers=2)
    workers = psutil.Process(proc.pid).children()
    proc.kill()
    proc.wait(timeout=60)
    done.set()
    assert _pairs(prefix) == []  # only *.tmp-PID files: nothing that looks like a dataset
    assert glob.glob(prefix + "_text_document.bin.tmp-*")
    gone, alive = psutil.wait_procs(workers, timeout=30)  # workers die with their parent
    assert not alive
    summary = preprocess(small_jsonl, prefix, tokenizer.path, quiet=True)
    assert not glob.glob(prefix + "*.tmp-*")  # the dead run's temporaries are gone
    assert len(IndexedDataset(summary["prefixes"]["text"])) == 40
