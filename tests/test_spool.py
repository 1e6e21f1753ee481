"""The spool on its own (G5's store): plain bytes in, reads at offsets out.

No socket, no hub: the spool never waits, so every test here is a sequence
of appends and reads, and the threaded one reads while another thread
appends.
"""

from __future__ import annotations

import os
import threading

import pytest
from processkit import open_files_in

from geventctx.spool import Forgotten, Spool


def test_reads_see_bytes_as_they_arrive_and_only_those():
    spool = Spool(memory_limit=100)
    assert spool.read(0, 10) == b""  # nothing yet: never blocks, never invents
    spool.append(b"hello ")
    assert spool.read(0, 3) == b"hel"
    assert spool.read(3, 100) == b"lo "  # only what has arrived
    spool.append(b"world")
    assert spool.read(6, -1) == b"world"
    assert spool.size == 11 and not spool.done
    spool.end()
    assert spool.ended and spool.done and spool.read(0, -1) == b"hello world"


def test_memory_limit_moves_the_bytes_to_an_unnamed_file_and_close_frees_it(tmp_path):
    spool = Spool(memory_limit=8, directory=str(tmp_path))
    spool.append(b"12345678")
    assert not spool.on_disk  # exactly at the limit: still in memory
    assert open_files_in(str(tmp_path)) == []
    spool.append(b"9")  # one past it
    assert spool.on_disk
    assert os.listdir(tmp_path) == []  # no name on disk, ever
    assert len(open_files_in(str(tmp_path))) == 1
    data = os.urandom(300_000)
    spool.append(data)
    assert spool.read(0, 9) == b"123456789"
    assert spool.read(9, -1) == data
    assert spool.read(5, 10) == b"6789" + data[:6]
    spool.close()
    assert open_files_in(str(tmp_path)) == []
    with pytest.raises(ValueError):
        spool.read(0, 1)


def test_failure_is_kept_and_ends_the_spool():
    spool = Spool()
    spool.append(b"abc")
    error = ConnectionError("client gone")
    spool.fail(error)
    assert spool.error is error and spool.done and not spool.ended
    assert spool.read(0, -1) == b"abc"  # what arrived stays readable; the caller raises
    spool.end()  # too late: it failed
    assert not spool.ended
    with pytest.raises(RuntimeError):
        spool.append(b"more")


def test_append_after_close_is_dropped():
    # A read in flight when the request ends finishes; its bytes go nowhere.
    spool = Spool()
    spool.append(b"abc")
    spool.close()
    spool.append(b"def")
    assert spool.closed and spool.size == 3


def test_find_scans_within_the_limit_across_memory_and_file(tmp_path):
    spool = Spool(memory_limit=4, directory=str(tmp_path))
    spool.append(b"ab")
    spool.append(b"cd\nef\n")
    assert spool.find(b"\n", 0, 100) == 4
    assert spool.find(b"\n", 5, 100) == 7
    assert spool.find(b"\n", 5, 7) == -1  # not within the limit
    spool.close()


def test_a_thread_reads_consistently_while_the_hub_appends_and_rolls_over(tmp_path):
    spool = Spool(memory_limit=64 * 1024, directory=str(tmp_path))
    data = os.urandom(2 * 1024 * 1024)
    seen = []
    done = threading.Event()

    def reader() -> None:
        position = 0
        while position < len(data):
            ended = spool.done  # before the read: the last bytes come before the end
            chunk = spool.read(position, 7919)
            seen.append(chunk)
            position += len(chunk)
            if not chunk and ended:
                break
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    for start in range(0, len(data), 4096):
        spool.append(data[start : start + 4096])
    spool.end()
    assert done.wait(30)
    thread.join(5)
    assert b"".join(seen) == data
    spool.close()


def test_reads_across_pieces_in_memory():
    spool = Spool(memory_limit=1000)
    for piece in (b"ab", b"cde", b"f", b"ghij"):
        spool.append(piece)
    assert spool.read(1, 6) == b"bcdefg"  # spans four pieces
    assert spool.read(2, 3) == b"cde"  # exactly one piece
    assert spool.read(9, 5) == b"j"


def test_a_held_spool_stays_in_memory_and_shares_the_whole_body(tmp_path):
    spool = Spool(memory_limit=4, directory=str(tmp_path))
    assert spool.hold()
    for piece in (b"abc", b"def", b"ghi"):
        spool.append(piece)  # past the limit, but held
    assert not spool.on_disk
    spool.end()
    whole = spool.whole()
    assert whole == b"abcdefghi"
    assert spool.whole() is whole  # one object, kept as the only piece
    spool.unhold()
    assert not spool.on_disk  # the whole is the reader's own: no copy on disk


def test_an_unheld_spool_past_its_limit_moves_to_disk(tmp_path):
    # The whole-body read stopped early (killed, failed): the limit counts again.
    spool = Spool(memory_limit=4, directory=str(tmp_path))
    assert spool.hold()
    spool.append(b"abc")
    spool.append(b"def")
    spool.unhold()
    assert spool.on_disk and spool.read(0, -1) == b"abcdef"
    assert not spool.hold()  # on disk: nothing to hold
    spool.close()


def test_forgotten_bytes_free_memory_and_the_limit_counts_only_the_bytes_kept(tmp_path):
    # G5: bytes nobody will read again are freed, so a reader that reads as
    # bytes arrive keeps the spool small, however large the body.
    spool = Spool(memory_limit=8, directory=str(tmp_path))
    for piece in (b"abcd", b"efgh", b"ijkl", b"mnop"):
        spool.append(piece)
        spool.forget(spool.size - 2)  # the reader is two bytes behind
    assert not spool.on_disk and spool.written == 0  # 16 bytes seen, never more than 8 kept
    assert spool.size == 16 and spool.kept_from == 12 and spool.most_kept == 8
    assert spool.read(14, 2) == b"op"
    with pytest.raises(Forgotten):
        spool.read(4, 1)  # freed: an error, never other bytes
    spool.forget(13)  # within the last piece: it stays whole
    assert spool.read(12, -1) == b"mnop"


def test_skipped_bytes_are_counted_and_kept_nowhere(tmp_path):
    spool = Spool(memory_limit=4, directory=str(tmp_path))
    spool.append(b"ab")
    assert spool.skip(1_000_000)  # a reader read them straight off the input
    assert spool.size == 1_000_002 and spool.kept_from == spool.size
    assert not spool.on_disk and spool.written == 0 and spool.most_kept == 2
    with pytest.raises(Forgotten):
        spool.read(0, 2)
    assert spool.read(spool.size, 10) == b""  # at the end: nothing yet
    spool.append(b"xyz")
    assert spool.read(1_000_002, -1) == b"xyz"
    with pytest.raises(Forgotten):
        spool.whole()  # not the whole body any more


def test_a_spill_after_forgetting_reads_at_the_right_offsets(tmp_path):
    spool = Spool(memory_limit=4, directory=str(tmp_path))
    spool.append(b"abc")
    spool.append(b"def")  # 6 > 4: the kept bytes go to disk from here
    assert spool.on_disk and spool.written == 6
    spool.forget(6)  # on disk: nothing is freed, everything stays readable
    assert spool.read(0, 6) == b"abcdef"

    spool = Spool(memory_limit=4, directory=str(tmp_path))
    spool.append(b"abc")
    spool.append(b"d")
    spool.forget(3)
    spool.append(b"efghi")  # 1 kept + 5 > 4: the file starts at offset 3
    assert spool.on_disk and spool.written == 6
    assert spool.read(3, 6) == b"defghi" and spool.read(5, 2) == b"fg"
    with pytest.raises(Forgotten):
        spool.read(2, 1)
    assert not spool.skip(1)  # on disk: bytes cannot be left out
    spool.close()


def test_a_held_spool_forgets_and_skips_nothing():
    spool = Spool(memory_limit=4)
    assert spool.hold()
    spool.append(b"abc")
    spool.forget(3)
    assert not spool.skip(5)
    assert spool.whole() == b"abc"
    spool.unhold()
