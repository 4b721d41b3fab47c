"""Data before Ray: ``studies prepare`` makes each data set once (atomically, under a lock) and ``studies run``
checks every cell's data before Ray starts, exiting 2 with one line per missing data set."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from regtune.data import cifar
from regtune.data.cifar import MANIFEST, CifarData, prepare_cifar, write_fake_cifar
from regtune.data.imagenet import INDEX, ImageFolderData, prepare_imagenet, write_fake_imagenet
from regtune.data.provenance import GENERATED_FILE
from regtune.data.text import prepare
from studies import get_study
from studies.engine.preflight import missing_lines
from tests.conftest import ROOT, cli_env, run_cli


# ------------------------------------------------------------------------------------ studies run, no data
@pytest.mark.parametrize("study,datasets", [
    ("cpr_cifar100", {"cifar100": "cifar-100-python"}),
    ("ire_llama", {"wikitext103": "wikitext103/gpt2", "minipile": "minipile/gpt2", "openwebtext": "openwebtext/gpt2"}),
])
def test_run_without_data_exits_2_before_ray_with_one_line_per_data_set(study, datasets, tmp_path):
    data, storage = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    start = time.monotonic()
    proc = run_cli("run", study, "--scale", "paper", "--storage", str(storage), timeout=300,
                   REGTUNE_DATA_DIR=str(data))
    print(f"{study}: exit {proc.returncode} after {time.monotonic() - start:.1f} s")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(datasets), lines
    for line, (name, folder) in zip(lines, datasets.items()):
        assert line.startswith(f"error: data set {name}") and f"missing {data / folder}" in line
        assert f"prepare it with: python -m studies prepare {name}" in line and f"--data-dir {data}" in line
    assert "Ray" not in proc.stdout + proc.stderr
    assert not storage.exists() and not any(data.iterdir())  # nothing written, nothing downloaded


def test_preflight_checks_files_sizes_and_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("REGTUNE_DATA_DIR", str(tmp_path))
    study = get_study("cpr_cifar100")
    write_fake_cifar(tmp_path, "cifar100", n_train=500, n_test=100)
    assert missing_lines(study, "paper", {"n_train": 300, "n_val": 100}) == []
    (line,) = missing_lines(study, "paper")  # the paper split reads 40000 + 10000 training images
    assert "has 500 train images, the task reads 50000" in line
    train = tmp_path / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:1000])  # cut short
    (line,) = missing_lines(study, "paper", {"n_train": 300, "n_val": 100})
    assert f"{train} is incomplete (1000 of" in line
    (tmp_path / "cifar-100-python" / MANIFEST).unlink()
    (line,) = missing_lines(study, "paper", {"n_train": 300, "n_val": 100})
    assert f"no {MANIFEST}" in line and "python -m studies prepare cifar100" in line
    # smoke generates its own data in the study dir; unless --set data_dir points elsewhere
    assert missing_lines(study, "smoke") == []
    assert "nowhere" in missing_lines(study, "smoke", {"data_dir": str(tmp_path / "nowhere")})[0]


def test_preflight_of_text_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("REGTUNE_DATA_DIR", str(tmp_path))
    study = get_study("ire_llama")
    overrides = {"tokenizer": "local-bpe", "context": 32}
    for corpus in ("wikitext103", "minipile", "openwebtext"):
        prepare(corpus, data_dir=tmp_path, tokenizer="local-bpe", vocab_size=300, synthetic_lines=200)
    assert missing_lines(study, "paper", overrides) == []
    val = tmp_path / "minipile" / "local-bpe" / "val.bin"
    val.write_bytes(val.read_bytes()[:10])
    (line,) = missing_lines(study, "paper", overrides)
    assert line.startswith("data set minipile (local-bpe tokens) of cells minipile_llama119m-adamw")
    assert f"{val} holds 10 bytes, meta.json promises" in line
    assert "python -m studies prepare minipile --tokenizer local-bpe" in line
    lines = missing_lines(study, "paper", {"tokenizer": "local-bpe", "context": 100_000})
    assert len(lines) == 3 and "a window needs 100001" in lines[0]


# ---------------------------------------------------------------------------------------- CIFAR prepare
def fake_archive(tmp_path: Path, kind: str) -> tuple[Path, dict[str, str]]:
    """A small archive in torchvision's CIFAR format (as cs.toronto.edu serves it) and its md5 sums."""
    spec = cifar.SPECS[kind]
    src = write_fake_cifar(tmp_path / "src", kind, n_train=60, n_test=20)
    (src / spec.folder / MANIFEST).unlink()  # the real archive has none
    archive = tmp_path / ("cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / spec.folder, arcname=spec.folder)

    def md5(p: Path) -> str:
        return hashlib.md5(p.read_bytes()).hexdigest()

    sums = {"archive": md5(archive), "meta": md5(src / spec.folder / spec.meta_file)}
    sums.update({f: md5(src / spec.folder / f) for f in spec.train_files + spec.test_files})
    return archive, sums


def patch_md5(cls, sums: dict[str, str]) -> None:
    """Give torchvision's class the fake archive's checksums (it checks them as it checks the real ones)."""
    cls.tgz_md5 = sums["archive"]
    cls.train_list = [[f, sums[f]] for f, _ in cls.train_list]
    cls.test_list = [[f, sums[f]] for f, _ in cls.test_list]
    cls.meta = {**cls.meta, "md5": sums["meta"]}


def test_prepare_from_a_local_archive_and_trials_read_it(tmp_path, monkeypatch):
    import torchvision

    archive, sums = fake_archive(tmp_path, "cifar10")
    for attr in ("tgz_md5", "train_list", "test_list", "meta"):
        monkeypatch.setattr(torchvision.datasets.CIFAR10, attr, getattr(torchvision.datasets.CIFAR10, attr))
    patch_md5(torchvision.datasets.CIFAR10, sums)
    data = tmp_path / "data"
    folder = prepare_cifar("cifar10", data, archive=archive, log=print)
    assert sorted(p.name for p in data.iterdir()) == [".cifar-10-batches-py.lock", "cifar-10-batches-py"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["images"] == {"train": 60, "test": 20} and manifest["source"].startswith("archive ")
    assert cifar.problem("cifar10", data, train=60, test=20) is None
    assert CifarData("cifar10", data_dir=str(data), n_train=40, n_val=20, n_test=None, device="cpu",
                     seed=0).test_x.shape[0] == 20
    # files placed by hand (no manifest) are md5-checked and indexed, nothing is fetched
    (folder / MANIFEST).unlink()
    prepare_cifar("cifar10", data, mirror="http://127.0.0.1:9/none", log=print)
    assert cifar.problem("cifar10", data) is None
    assert json.loads((folder / MANIFEST).read_text())["source"] == "existing files (md5 checked)"


def test_prepare_without_network_is_one_line_exit_2(tmp_path):
    proc = run_cli("prepare", "cifar100", "--data-dir", str(tmp_path / "d"), "--mirror", "http://127.0.0.1:9",
                   timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stdout.strip().splitlines()[-1:]
    assert line.startswith("error: could not prepare cifar100 from http://127.0.0.1:9/cifar-100-python.tar.gz")
    assert not (tmp_path / "d" / "cifar-100-python").exists()
    assert not list((tmp_path / "d").glob(".cifar-100-python.tmp-*"))  # the staging dir is gone


class Mirror:
    """An HTTP server on 127.0.0.1 serving one archive; every download is held until ``release`` is set."""

    def __init__(self, archive: Path):
        self.release, self.requests = threading.Event(), []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                mirror.requests.append(self.path)
                mirror.release.wait(timeout=300)
                if self.path != f"/{archive.name}":
                    self.send_error(404)
                    return
                body = archive.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)


PATCHED_CLI = """
import json, sys
import torchvision
sums = json.loads(sys.argv[1])
cls = torchvision.datasets.CIFAR100
cls.tgz_md5 = sums["archive"]
cls.train_list = [[f, sums[f]] for f, _ in cls.train_list]
cls.test_list = [[f, sums[f]] for f, _ in cls.test_list]
cls.meta = {**cls.meta, "md5": sums["meta"]}
from studies.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_concurrent_prepares_leave_one_complete_copy(tmp_path):
    archive, sums = fake_archive(tmp_path, "cifar100")
    data = tmp_path / "data"
    mirror = Mirror(archive)
    procs, logs = [], [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        for log in logs:
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", PATCHED_CLI, json.dumps(sums), "prepare", "cifar100", "--data-dir",
                     str(data), "--mirror", mirror.url], cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT))
        # the first holds the lock with its download held open by the server; the second must be waiting
        deadline = time.monotonic() + 240
        while not any("waiting for another prepare" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
        assert mirror.requests, "the lock holder has not asked the server yet"
        mirror.release.set()
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        mirror.close()
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], outs
    assert sum("prepared cifar100 in" in o for o in outs) == 1
    assert sum("cifar100 is already prepared" in o for o in outs) == 1  # the waiter found it complete
    assert sorted(p.name for p in data.iterdir()) == [".cifar-100-python.lock", "cifar-100-python"]
    folder = data / "cifar-100-python"
    # the archive was made by write_fake_cifar: its generated-data marker travels with it (paper scale refuses it)
    assert sorted(p.name for p in folder.iterdir()) == sorted([GENERATED_FILE, "meta", "test", "train", MANIFEST])
    assert cifar.problem("cifar100", data, train=60, test=20) is None
    for name in ("train", "test", "meta"):
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == sums[name]


# ------------------------------------------------------------------------------------------------- ImageNet
def test_prepare_imagenet_indexes_a_user_folder_and_the_study_passes(tmp_path):
    source = write_fake_imagenet(tmp_path / "ilsvrc", num_classes=3, train_per_class=4, val_per_class=2, size=16)
    data = tmp_path / "data"
    data.mkdir()
    proc = run_cli("run", "ire_imagenet", "--scale", "paper", "--storage", str(tmp_path / "r"), timeout=300,
                   REGTUNE_DATA_DIR=str(data))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"missing {data / 'imagenet' / 'train'}" in line and "python -m studies prepare imagenet" in line
    proc = run_cli("prepare", "--study", "ire_imagenet", "--source", str(source), timeout=300,
                   REGTUNE_DATA_DIR=str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = data / "imagenet"
    assert (root / "train").is_symlink() and (root / "train").resolve() == source / "train"
    index = json.loads((root / INDEX).read_text())
    assert index["images"] == {"train": 12, "val": 6} and len(index["classes"]) == 3
    assert not list(source.glob(INDEX))  # the user's folder is not written
    assert _missing_in(data, "ire_imagenet") == []  # what studies run checks, with REGTUNE_DATA_DIR=data
    folder = ImageFolderData(str(root), image_size=16, batch_size=2, eval_batch_size=2, seed=0, num_workers=0)
    assert len(folder.train_samples) == 12 and folder.num_classes == 3
    # in place, a second time: same result
    prepare_imagenet(source, out_dir=source, log=print)
    assert json.loads((source / INDEX).read_text())["images"] == index["images"]


def _missing_in(data: Path, study: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", "import json, sys; from studies import get_study; "
                           "from studies.engine.preflight import missing_lines; "
                           f"print(json.dumps(missing_lines(get_study({study!r}), 'paper')))"],
                          cwd=ROOT, env=cli_env(REGTUNE_DATA_DIR=str(data)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prepare_imagenet_without_a_source_is_exit_2(tmp_path):
    proc = run_cli("prepare", "imagenet", "--data-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 2
    assert "error: ImageNet not found" in proc.stdout and "--source DIR" in proc.stdout


# ----------------------------------------------------------------------------------------------------- text
def test_text_prepare_replaces_a_copy_atomically(tmp_path):
    out = tmp_path / "wikitext2" / "word"
    first = prepare("wikitext2", out_dir=out, tokenizer="word", synthetic_lines=100)
    second = prepare("wikitext2", out_dir=out, tokenizer="word", synthetic_lines=300)
    assert second["counts"]["train"] > first["counts"]["train"]
    assert json.loads((out / "meta.json").read_text())["counts"] == second["counts"]
    assert (out / "text" / "train.txt").is_file() and second["source"] == f"synthetic:{out.resolve() / 'text'}"
    assert sorted(p.name for p in out.parent.iterdir()) == [".word.lock", "word"]  # no staging dirs left


# ---------------------------------------------------------------------------------------------- arguments
def test_prepare_study_at_smoke_has_nothing_to_do(capsys):
    from studies.engine.prepare import main

    assert main(["--study", "cpr_cifar100", "--scale", "smoke"]) == 0
    assert "generates its own data when it runs: nothing to prepare" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["cifar10", "--source", "x"], "--source and --out-dir are for imagenet"),
    (["imagenet", "--mirror", "http://x"], "--mirror and --archive are for CIFAR"),
    (["cifar10", "--study", "cpr_cifar100"], "give a data set NAME or --study NAME"),
    (["--study", "cpr_cifar100", "--data-dir", "/x"], "--study prepares the data where"),
    (["mnist"], "invalid choice: 'mnist'"),
])
def test_prepare_bad_arguments_exit_2(args, message, capsys):
    from studies.engine.prepare import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err
