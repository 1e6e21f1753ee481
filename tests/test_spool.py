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

from geventctx.spool import Spool


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
