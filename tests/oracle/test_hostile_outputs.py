"""Issue 20, part 4 (outputs): what `-o` does to a hostile or unusual destination. Every output of the library and
the CLI goes through src/io/out.c (mmb__out_open / mmb__out_commit / mmb__out_abort), so `mmbridge encode -o` stands
for all of them: a FIFO, a character device (/dev/null as root) and a directory are refused and left alone; a
symlink is written through (its target replaced, the link kept); the replaced file's mode (and, as root, owner)
is kept; names up to NAME_MAX work (the temporary has a short name of its own); a temporary that a killed writer
left (`.mmb-HOSTHASH-PID-XXXXXX` with a dead PID) is removed by the next run; a failed write leaves no temporary
and the old file intact; the file and its directory are fsynced around the rename."""
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import threading

import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig

from conftest import BIN, run
from test_encode_images import S
from test_vit import TOWER, make_llava


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny LLaVA with its image processor, and one image: (model dir, image path)."""
    d = tmp_path_factory.mktemp("hostile_out")
    make_llava(d / "llava", CLIPVisionConfig(**TOWER))
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(d / "llava")
    img = d / "img.png"
    Image.new("RGB", (S, S), (10, 200, 30)).save(img)
    return d / "llava", img


def encode(model, out, check=True, **kw):
    """mmbridge encode of the one image to `out` (a 60 s bound: a FIFO must not block it)."""
    d, img = model
    p = subprocess.run([str(BIN), "encode", str(d), str(img), "-o", str(out)], capture_output=True, text=True,
                       timeout=60, **kw)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


# LeakSanitizer cannot run under ptrace: the strace tests turn it off (the sanitized build's other checks stay on).
NO_LSAN = {**os.environ, "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0"}


def temporaries(d):
    return [x.name for x in os.scandir(d) if x.name.startswith(".mmb-") or ".tmp." in x.name]


def host_tag():
    """src/io/out.c's host_tag: FNV-1a (32 bit) of the host name, 8 hex digits."""
    x = 2166136261
    for c in socket.gethostname().encode()[:255]:
        x = ((x ^ c) * 16777619) & 0xFFFFFFFF
    return f"{x:08x}"


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_fifo_is_refused_and_left_alone(model, tmp_path):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    got = []

    def reader():  # blocks in open() until a writer comes; the test releases it below if none did
        with open(fifo, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    p = encode(model, fifo, check=False)
    assert p.returncode == 1 and "is a FIFO; refusing to replace it" in p.stderr, p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the reader see EOF
    t.join(10)
    assert not t.is_alive() and got == [b""], got  # nothing was written into the FIFO either
    assert temporaries(tmp_path) == []


def test_a_directory_and_a_link_to_a_fifo_are_refused(model, tmp_path):
    (tmp_path / "d").mkdir()
    p = encode(model, tmp_path / "d", check=False)
    assert p.returncode == 1 and "is a directory" in p.stderr, p.stderr
    os.mkfifo(tmp_path / "fifo")
    os.symlink("fifo", tmp_path / "link")
    p = encode(model, tmp_path / "link", check=False)
    assert p.returncode == 1 and "is a FIFO" in p.stderr, p.stderr
    assert os.path.islink(tmp_path / "link") and stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert temporaries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a character device can only be made, and /dev/null only be "
                    "destroyed, by root")
def test_a_character_device_and_dev_null_are_refused(model, tmp_path):
    # first a private copy of /dev/null, so a regression harms only it...
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    p = encode(model, dev, check=False)
    assert p.returncode == 1 and "is a character device; refusing" in p.stderr, p.stderr
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    # ...then the real one
    before = os.lstat("/dev/null")
    p = encode(model, "/dev/null", check=False)
    after = os.lstat("/dev/null")
    assert p.returncode == 1 and "/dev/null: is a character device" in p.stderr, p.stderr
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_mode == before.st_mode
    assert after.st_ino == before.st_ino


def test_a_symlink_is_written_through(model, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.safetensors"
    target.write_bytes(b"old")
    os.symlink("real/t.safetensors", tmp_path / "link.safetensors")  # relative, into another directory
    os.symlink("link.safetensors", tmp_path / "chain.safetensors")   # and a link to the link
    encode(model, tmp_path / "chain.safetensors")
    assert os.readlink(tmp_path / "chain.safetensors") == "link.safetensors"
    assert os.readlink(tmp_path / "link.safetensors") == "real/t.safetensors"
    assert stat.S_ISREG(os.lstat(target).st_mode) and "embeddings" in load_file(str(target))
    # a dangling link: the file it names is created, the link kept
    os.symlink(str(tmp_path / "real" / "new.safetensors"), tmp_path / "dangling")
    encode(model, tmp_path / "dangling")
    assert os.path.islink(tmp_path / "dangling") and "embeddings" in load_file(str(tmp_path / "real" / "new.safetensors"))
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / "real") == []


def test_the_mode_of_the_replaced_file_is_kept(model, tmp_path):
    out = tmp_path / "secret.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    encode(model, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600 and "embeddings" in load_file(str(out))
    os.chmod(out, 0o640)
    encode(model, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    # a new file: 0666 & ~umask, as fopen(path, "w") makes it
    mask = os.umask(0o027)
    try:
        encode(model, tmp_path / "new.safetensors")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_root_keeps_the_owner_of_the_replaced_file(model, tmp_path):
    out = tmp_path / "theirs.safetensors"
    out.write_bytes(b"old")
    os.chown(out, 65534, 65534)
    os.chmod(out, 0o604)
    encode(model, out)
    st = os.stat(out)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o604)


@pytest.mark.parametrize("length", [250, 255])
def test_a_name_near_name_max_works(model, tmp_path, length):
    out = tmp_path / ("x" * (length - len(".safetensors")) + ".safetensors")
    assert len(out.name) == length
    encode(model, out)
    assert "embeddings" in load_file(str(out))
    encode(model, out)  # and replacing it
    assert temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed(model, tmp_path):
    tag = host_tag()
    stale = tmp_path / f".mmb-{tag}-{dead_pid()}-abcDE9"          # a writer killed with -9
    live = tmp_path / f".mmb-{tag}-{os.getpid()}-abcdef"           # a writer still running: this process
    other_host = tmp_path / f".mmb-0badf00d-{dead_pid()}-abcdef"   # another host's: its PIDs mean nothing here
    unrelated = tmp_path / ".mmb-notes"
    for f in (stale, live, other_host, unrelated):
        f.write_bytes(b"partial")
    encode(model, tmp_path / "out.safetensors")
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_killed_writer_leaves_a_temporary_the_next_run_removes(model, tmp_path):
    """A real kill -9 in the middle of a write, made reproducible: strace delivers SIGKILL when the writer fsyncs
    its temporary (written, not yet renamed). The next run in that directory recognises and removes it."""
    d, img = model
    out = tmp_path / "out.safetensors"
    p = subprocess.run(["strace", "-o", str(tmp_path / "trace"), "-e", "trace=fsync", "-e",
                        "inject=fsync:signal=KILL", str(BIN), "encode", str(d), str(img), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=NO_LSAN)
    if "ptrace" in p.stderr or "inject" in p.stderr:
        pytest.skip("strace cannot inject here: " + p.stderr[-200:])
    assert not out.exists(), p.stderr
    left = temporaries(tmp_path)
    assert len(left) == 1 and re.fullmatch(rf"\.mmb-{host_tag()}-\d+-\w{{6}}", left[0]), left
    encode(model, tmp_path / "next.safetensors")
    assert temporaries(tmp_path) == []


def test_a_write_failing_midway_leaves_no_temporary_and_the_old_file(model, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old contents")

    def small_files():  # files of at most 200 bytes, and EFBIG instead of SIGXFSZ past that
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    p = encode(model, out, check=False, preexec_fn=small_files)
    assert p.returncode == 1 and "write failed" in p.stderr and str(out) in p.stderr, p.stderr
    assert out.read_bytes() == b"old contents"
    assert temporaries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_directory_fails_cleanly(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        p = encode(model, ro / "out.safetensors", check=False)
        assert p.returncode == 1 and "cannot create a temporary file" in p.stderr, p.stderr
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_file_and_its_directory_are_fsynced_around_the_rename(model, tmp_path):
    d, img = model
    log = tmp_path / "trace"
    out = tmp_path / "out.safetensors"
    p = subprocess.run(["strace", "-f", "-o", str(log), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                        str(BIN), "encode", str(d), str(img), "-o", str(out)], capture_output=True, text=True,
                       timeout=120, env=NO_LSAN)
    if p.returncode != 0 and "ptrace" in p.stderr:
        pytest.skip("strace cannot trace here: " + p.stderr[-200:])
    assert p.returncode == 0, p.stderr
    calls = [l.split(None, 1)[1] for l in log.read_text().splitlines() if "(" in l and "resumed" not in l]
    i = next(k for k, c in enumerate(calls) if c.startswith("rename") and str(out) in c)
    assert any(c.startswith("fsync") for c in calls[:i]), calls  # the file, before
    assert any(c.startswith("fsync") for c in calls[i + 1:]), calls  # the directory, after
