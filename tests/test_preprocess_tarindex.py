"""The one tar reader against Python's ``tarfile`` (the independent reference): our USTAR shards and the
foreign formats GNU tar and pax write (long and non-ASCII names, prefixes, links, sizes past octal)."""
import gzip
import io
import os
import tarfile

import pytest
from fuzzing import corruptions, deadline

from rankshard.preprocess.errors import RankshardError, SourceError
from rankshard.preprocess.format.tar import write_shard
from rankshard.preprocess.format.tarindex import (BytesBlob, TarDamage, _parse_header, iter_tar, read_shard, scan_shard,
                                                  split_name)
from rankshard.preprocess.sources.folders import list_wds, tar_members

LONG = "deep/" * 30 + "n01440764_10026.JPEG"          # 170 bytes: needs GNU longname or pax path
PREFIXED = "a" * 90 + "/" + "b" * 90 + ".JPEG"          # fits the USTAR prefix + name split
NON_ASCII = "クラス/żółw-ünïcødé.png"


def _write(path, fmt, files: dict[str, bytes], extras=True):
    with tarfile.open(path, "w", format=fmt) as tar:
        if extras:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in files.items():
            tar.addfile(_info(name, len(data)), io.BytesIO(data))
        if extras:
            link = tarfile.TarInfo("a-link-with-a-very-long-target")
            link.type = tarfile.SYMTYPE
            link.linkname = "x" * (150 if fmt != tarfile.USTAR_FORMAT else 50)  # GNU: a K member
            tar.addfile(link)


def _info(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uname = size, 1_700_000_000, "someone"
    return info


def _reference(path):
    """(name, data offset, size, bytes) of every regular file, as tarfile sees them."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _ours(path):
    with open(path, "rb") as f:
        return [(m.name, m.offset, m.size, path.read_bytes()[m.offset:m.offset + m.size]) for m in iter_tar(f)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile_in_every_format(tmp_path, fmt):
    files = {"short.jpg": b"abc", PREFIXED: b"p" * 700, "empty.cls": b""}
    if fmt != tarfile.USTAR_FORMAT:  # USTAR cannot hold these names at all
        files |= {LONG: b"L" * 1025, NON_ASCII: b"\xff\x00" * 300}
    path = tmp_path / "a.tar"
    _write(path, fmt, files)
    assert _ours(path) == _reference(path)
    assert sorted(m[0] for m in _ours(path)) == sorted(files)


def test_pax_global_header_and_old_v7_headers(tmp_path):
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tar:
        tar.addfile(_info("one.png", 5), io.BytesIO(b"12345"))
    v7 = tmp_path / "v7.tar"
    with tarfile.open(v7, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_info("two.png", 3), io.BytesIO(b"xyz"))
    raw = bytearray(v7.read_bytes())
    raw[257:265] = b"\0" * 8  # strip the magic: a pre-POSIX (V7) header, checksum fixed below
    raw[148:156] = b"%06o\0 " % (sum(raw[:148]) + 256 + sum(raw[156:512]))
    v7.write_bytes(bytes(raw))
    for p in (path, v7):
        assert _ours(p) == _reference(p)


def test_base256_sizes_as_tarfile_parses_them():
    # GNU tar writes sizes of 8 GiB and more in base-256; such a file cannot be a test fixture, its header can
    info = _info("huge.npy", 9 * 2**30)
    header = info.tobuf(tarfile.GNU_FORMAT)
    assert _parse_header(header[:512]).size == tarfile.TarInfo.frombuf(header[:512], "utf-8", "strict").size


def test_pax_size_overrides_the_header(tmp_path):
    # pax moves a size that octal cannot hold into the extended header (header size 0); craft one that fits
    path = tmp_path / "p.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = _info("big.bin", 1536)
        info.pax_headers = {"size": "1536"}
        tar.addfile(info, io.BytesIO(b"q" * 1536))
        tar.addfile(_info("after.cls", 1), io.BytesIO(b"7"))
    assert _ours(path) == _reference(path)


def test_a_tar_inside_a_tar_is_read_in_place(tmp_path):
    inner = tmp_path / "n01440764.tar"
    _write(inner, tarfile.GNU_FORMAT, {"n01440764_1.JPEG": b"j" * 600, LONG: b"k" * 30})
    outer = tmp_path / "train.tar"
    _write(outer, tarfile.GNU_FORMAT, {"n01440764.tar": inner.read_bytes()})
    with open(outer, "rb") as f:
        (_, start, size), = tar_members(f)
        nested = tar_members(f, start, size, "nested")
    expected = [(n, start + o, s) for n, o, s, _ in _reference(inner)]
    assert nested == expected


def test_our_shards_read_back_as_tarfile_reads_them(tmp_path):
    samples = [(f"{i:08d}", {"cls": b"%d" % i, "json": b"{}", "png": bytes(range(i, i + 90))}) for i in range(4)]
    write_shard(tmp_path / "s.tar", samples)
    assert read_shard(tmp_path / "s.tar") == samples
    by_key = {}
    for name, _, _, data in _reference(tmp_path / "s.tar"):
        key, ext = split_name(name)
        by_key.setdefault(key, {})[ext] = data
    assert list(by_key.items()) == samples


def test_foreign_wds_shards_with_folders_and_long_keys(tmp_path):
    key = "x" * 120  # beyond USTAR's 100-byte name: GNU longname members
    path = tmp_path / "foreign-000000.tar"
    _write(path, tarfile.GNU_FORMAT, {f"sub/{key}.jpg": b"J", f"sub/{key}.cls": b"3", "sub/k2.png": b"P",
                                      "sub/k2.cls": b"1"}, extras=False)
    listing = list_wds([str(path)])
    assert sorted(zip(listing.ids, listing.label.tolist())) == [(f"{path.name}:sub/k2", 1),
                                                                 (f"{path.name}:sub/{key}", 3)]


def test_damage_is_named(tmp_path):
    samples = [(f"{i:08d}", {"cls": b"1", "png": b"x" * 2000}) for i in range(3)]
    write_shard(tmp_path / "s.tar", samples)
    whole = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:6000])
    index = scan_shard(tmp_path / "cut.tar")
    assert "truncated" in index.problem and index.keys == ["00000000"]  # the cut sample is dropped
    with pytest.raises(Exception, match="cut.tar: truncated"):
        read_shard(tmp_path / "cut.tar")
    (tmp_path / "gz.tar").write_bytes(gzip.compress(whole))
    with open(tmp_path / "gz.tar", "rb") as f, pytest.raises(SourceError, match="gzip-compressed.*decompress"):
        tar_members(f, what="gz.tar")
    with open(tmp_path / "cut.tar", "rb") as f, pytest.raises(TarDamage, match="truncated inside member"):
        list(iter_tar(f))


def test_sparse_members_are_refused(tmp_path):
    path = tmp_path / "sparse.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = _info("holey.bin", 0)
        info.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(info)
    with open(path, "rb") as f, pytest.raises(TarDamage, match="sparse"):
        list(iter_tar(f))


def test_header_checksums_summed_as_signed_chars_are_accepted():
    """Some old tars sum the header as signed chars: both sums are accepted, anything else is refused."""
    block = bytearray(tarfile.TarInfo("\u00e9t\u00e9.png").tobuf(tarfile.USTAR_FORMAT, "utf-8"))  # bytes >= 128
    fields = bytes(block[:148]) + bytes(block[156:512])
    unsigned = sum(fields) + 8 * 32
    signed = unsigned - 256 * sum(b >= 128 for b in fields)
    assert signed != unsigned
    for checksum, ok in ((unsigned, True), (signed, True), (unsigned + 1, False)):
        block[148:156] = b"%06o\0 " % checksum
        if ok:
            assert _parse_header(bytes(block[:512])).name == "\u00e9t\u00e9.png"
        else:
            with pytest.raises(ValueError, match="checksum"):
                _parse_header(bytes(block[:512]))


def _pax_tar_with_record(record: bytes) -> io.BytesIO:
    """A tar whose one member carries a pax header holding ``record`` verbatim (lengths not recomputed)."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    out = io.BytesIO()
    out.write(header.tobuf(tarfile.USTAR_FORMAT))
    out.write(record + b"\0" * (-len(record) % 512))
    member = _info("a.png", 3)
    out.write(member.tobuf(tarfile.USTAR_FORMAT) + b"abc" + b"\0" * 509 + b"\0" * 1024)
    out.seek(0)
    return out


@pytest.mark.parametrize("record", [
    b"0 path=x\n",            # length 0: the scan never advanced (an endless loop on a hostile shard)
    b"3 path=x\n",            # shorter than its own length field
    b"99 path=evil\n",        # past the end of the header's data: was accepted as path "evil\n"
    b"12 path=abc!",          # not ended by a newline
])
def test_hostile_pax_record_lengths_are_damage_not_a_hang(record):
    f = _pax_tar_with_record(record)
    blob_bytes = f.getvalue()
    with pytest.raises(TarDamage, match="corrupt extended header"):
        list(iter_tar(BytesBlob(blob_bytes)))
    good = _pax_tar_with_record(b"17 path=good.png\n").getvalue()
    assert [m.name for m in iter_tar(BytesBlob(good))] == ["good.png"]


@pytest.mark.parametrize("cls", [b"cat", b"\xff\xfe", b""])
def test_foreign_wds_cls_that_is_not_an_integer_is_named(tmp_path, cls):
    path = tmp_path / "in-000000.tar"
    _write(path, tarfile.USTAR_FORMAT, {"a.jpg": b"x", "a.cls": b"1", "b.jpg": b"y", "b.cls": cls}, extras=False)
    with pytest.raises(SourceError, match=f"{path}: sample 'b' has .cls .*not an integer class index"):
        list_wds([str(path)])


def test_foreign_wds_with_a_huge_class_index_is_refused_naming_the_fix(tmp_path):
    from rankshard.preprocess.sources.folders import MAX_WDS_CLASSES

    path = tmp_path / "in-000000.tar"
    huge = str(10**9).encode()
    _write(path, tarfile.USTAR_FORMAT, {"a.jpg": b"x", "a.cls": b"1", "b.jpg": b"y", "b.cls": huge}, extras=False)
    with pytest.raises(SourceError, match=r"1,000,000,000 makes 1,000,000,001 classes .*2 of them used.*remap"):
        list_wds([str(path)])
    ok = tmp_path / "ok-000000.tar"
    top = str(MAX_WDS_CLASSES - 1).encode()
    _write(ok, tarfile.USTAR_FORMAT, {"a.jpg": b"x", "a.cls": b"1", "b.jpg": b"y", "b.cls": top}, extras=False)
    assert len(list_wds([str(ok)]).classes) == MAX_WDS_CLASSES


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_hard_link_is_read_as_the_data_it_names(tmp_path, fmt):
    """GNU tar stores a file linked twice once; the second name is a hard link. tarfile itself reads the
    link's data as the target's: so must the index (a wds sample's .jpg as a link had 'no image')."""
    path = tmp_path / "linked.tar"
    target = "d" * (120 if fmt != tarfile.USTAR_FORMAT else 10) + "/a.jpg"  # past 100 chars: a long link
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_info(target, 5), io.BytesIO(b"image"))
        tar.addfile(_info("a.cls", 1), io.BytesIO(b"3"))
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, target
        tar.addfile(link)
        tar.addfile(_info("b.cls", 1), io.BytesIO(b"4"))
        dangling = tarfile.TarInfo("c.jpg")
        dangling.type, dangling.linkname = tarfile.LNKTYPE, "not-in-this-archive.jpg"
        tar.addfile(dangling)
    with open(path, "rb") as f:
        got = {m.name: os.pread(f.fileno(), m.size, m.offset) for m in iter_tar(f)}
    with tarfile.open(path) as tar:
        assert tar.extractfile("b.jpg").read() == b"image"  # the reference
    assert got == {target: b"image", "a.cls": b"3", "b.jpg": b"image", "b.cls": b"4"}


def _with_size_field(tar: bytes, at: int, field: bytes) -> bytes:
    """``tar`` with the size field of the header at byte ``at`` replaced by ``field`` and its checksum redone."""
    block = bytearray(tar[at:at + 512])
    block[124:136] = field.ljust(12, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return tar[:at] + bytes(block) + tar[at + 512:]


@pytest.mark.parametrize("field", [b"-0000001000", b"-0000002000"])  # -512: back onto itself; -1024: one before
def test_a_negative_member_size_is_damage_not_an_endless_scan(tmp_path, field):
    write_shard(tmp_path / "s.tar", [(f"{i:08d}", {"cls": b"1", "png": b"x" * 600}) for i in range(2)])
    bad = _with_size_field((tmp_path / "s.tar").read_bytes(), 1024, field)  # the png header (the first: cls)
    with deadline(5), pytest.raises(TarDamage, match="negative size"):
        list(iter_tar(BytesBlob(bad)))
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = _info("a.png", 3)
        info.pax_headers = {"size": "-512"}
        tar.addfile(info, io.BytesIO(b"abc"))
    with deadline(5), pytest.raises(TarDamage, match="negative size"):
        list(iter_tar(BytesBlob(pax.getvalue())))


def _members(data: bytes):
    return [(m.offset, m.size) for m in iter_tar(BytesBlob(data))]


def test_corrupt_and_hostile_tars_read_back_whole_or_are_damage(tmp_path):
    """Property test: our shard and GNU and pax tars with long names and links, cut at 64 lengths and bit-flipped
    at 256 places each (the same members at the same offsets, or TarDamage; a flip inside a long name's text
    renames that member only: it carries no checksum), then every header's size field set to hostile numbers
    with its checksum redone (members inside the file, or TarDamage); never a hang."""
    write_shard(tmp_path / "own.tar", [(f"{i:08d}", {"cls": b"1", "png": b"x" * 700}) for i in range(2)])
    _write(tmp_path / "gnu.tar", tarfile.GNU_FORMAT, {LONG: b"j" * 600, NON_ASCII: b"k" * 30})
    _write(tmp_path / "pax.tar", tarfile.PAX_FORMAT, {LONG: b"j" * 600, NON_ASCII: b"k" * 30})
    hostile = [b"-0000001000", b"-1", b"-0", b"\x80" + b"\xff" * 11, b"\xff" * 12, b"77777777777", b"8", b"1_0",
               b" -7 ", b"\x80" + (1 << 40).to_bytes(11, "big")]
    for name in ("own.tar", "gnu.tar", "pax.tar"):
        good = (tmp_path / name).read_bytes()
        original = _members(good)
        end = max(offset + size for offset, size in original) + 1024  # headers and data, and the end-of-archive marker
        for data in corruptions(good, span=(0, end)):
            with deadline(2):
                try:
                    assert _members(data) == original
                except TarDamage:
                    pass
        headers = [at for at in range(0, end, 512) if good[at + 257:at + 262] == b"ustar"]
        for at in headers:
            for field in hostile:
                with deadline(2):
                    try:
                        members = _members(_with_size_field(good, at, field))
                    except TarDamage:
                        continue
                    assert all(size >= 0 and offset + size <= len(good) for offset, size in members), (name, at, field)


def test_a_sample_split_across_a_large_tar_is_found_in_one_pass(tmp_path):
    """30,000 samples and the first one's second member at the end: finding it compared each key with all the
    keys before it (some 8 s here); one pass over a set takes a fraction of a second."""
    from rankshard.preprocess.format.tar import ustar_header

    headers = [ustar_header(f"{i:08d}.cls", 0) for i in range(30_000)] + [ustar_header("00000000.png", 0)]
    (tmp_path / "split.tar").write_bytes(b"".join(headers) + b"\0" * 1024)
    with deadline(3), pytest.raises(RankshardError, match="members of sample 00000000 are not contiguous"):
        read_shard(tmp_path / "split.tar")
