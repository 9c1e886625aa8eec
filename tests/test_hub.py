"""Checkpoints by Hub id: a Hub cache laid out by hand (offline), and a stand-in Hub over HTTP."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main
from lmforge.peft.adapters import save_adapter
from lmforge.peft.lora import add_lora, lora_layers
from lmforge.tokenizer import Tokenizer
from hub_cache import cache_repo

REV1, REV2 = hashlib.sha1(b"first").hexdigest(), hashlib.sha1(b"second").hexdigest()
PROMPT = ["--prompt", "Nora Yilmaz was born in", "--temperature", "0", "--max-new-tokens", "8"]


def sharpened(path: Path, out: Path, seed: int) -> Path:
    """The model at `path` re-initialised from `seed`, its matrices scaled up (peaked next-token
    distributions: distinct greedy picks), saved at `out` with the tokenizer."""
    model = load_model(path)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return save_model(model, out, tokenizer=Tokenizer.from_dir(path))


def with_lora(base: Path) -> torch.nn.Module:
    """The base at `base` with LoRA on q/v projections whose B matrices are not zero."""
    model = add_lora(load_model(base), r=2, alpha=4, targets=["q_proj", "v_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 2)
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory, chat_base) -> dict[str, Path]:
    """A Hub cache holding org/tiny at two revisions (main is the first) and org/tiny-lora (a LoRA
    adapter whose base is `org/tiny`), and a local adapter naming the first snapshot by path."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    first = cache_repo(cache, "org/tiny", sharpened(chat_base, root / "v1", 1), REV1)
    second = cache_repo(cache, "org/tiny", sharpened(chat_base, root / "v2", 2), REV2, refs=("v2",))
    adapter = with_lora(first)
    save_adapter(adapter, root / "lora-hub", base="org/tiny")
    lora = cache_repo(cache, "org/tiny-lora", root / "lora-hub", hashlib.sha1(b"lora").hexdigest())
    save_adapter(adapter, root / "lora-local", base=first)
    return {"cache": cache, "first": first, "second": second, "lora": lora, "lora_local": root / "lora-local"}


@pytest.fixture
def offline_hub(hub, monkeypatch) -> dict[str, Path]:
    """The cache as HF_HUB_CACHE with HF_HUB_OFFLINE=1, and every internet connection refused."""
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access in an offline test: {address}")
        return connect(sock, address)

    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return hub


def generate(capsys, checkpoint: str | Path, *flags: str) -> str:
    assert main(["generate", "--checkpoint", str(checkpoint), *PROMPT, *flags]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_hub_ids_load_as_their_cached_snapshots(offline_hub, capsys):
    first = generate(capsys, offline_hub["first"])
    second = generate(capsys, offline_hub["second"])
    assert first != second  # the revisions are different models
    assert generate(capsys, "org/tiny") == first  # main
    assert generate(capsys, f"org/tiny@{REV1}") == first
    assert generate(capsys, f"org/tiny@{REV2}") == second
    assert generate(capsys, "org/tiny@v2") == second  # a branch or tag, through refs/


def test_adapter_repo_finds_its_base_by_hub_id(offline_hub, capsys):
    assert json.loads((offline_hub["lora"] / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny"
    expected = generate(capsys, offline_hub["lora_local"])
    assert expected != generate(capsys, "org/tiny")  # the adapter changes the model
    assert generate(capsys, "org/tiny-lora") == expected


def test_recipe_base_by_hub_id_trains_and_names_it(offline_hub, tmp_path, capsys):
    from lmforge.world.documents import write_instruction_data
    from lmforge.world.people import make_world

    data = write_instruction_data(make_world(0, n_people=20, n_companies=4), tmp_path / "qa.jsonl", "train")
    config = {"out_dir": str(tmp_path / "out"), "base": f"org/tiny@{REV2}",
              "data": {"datasets": [{"path": str(data)}], "max_len": 64, "val_fraction": 0.2, "eval_batches": 1},
              "adapter": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear", "trainable_tokens": []},
              "train": {"steps": 1, "micro_batch_size": 2, "log_every": 1, "eval_every": 1, "save_every": 1}}
    (tmp_path / "sft.yaml").write_text(json.dumps(config))
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0, capsys.readouterr().err
    assert "adapter written to" in capsys.readouterr().out
    adapter = tmp_path / "out" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("org/tiny", REV2)  # as PEFT writes Hub bases
    by_hub = generate(capsys, adapter)
    saved["base_model_name_or_path"], saved["revision"] = str(offline_hub["second"]), None
    (adapter / "adapter_config.json").write_text(json.dumps(saved))
    assert by_hub == generate(capsys, adapter)


def test_serve_merge_and_export_take_hub_ids(offline_hub, tmp_path, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    assert main(["serve", "--checkpoint", "org/tiny@v2"]) == 0
    assert "serving 'org/tiny' on" in capsys.readouterr().out  # the model's id in the API
    assert main(["merge", "--checkpoint", "org/tiny-lora", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert generate(capsys, tmp_path / "merged") == generate(capsys, offline_hub["lora_local"])
    for reference, out in (("org/tiny", "hub.gguf"), (offline_hub["first"], "dir.gguf")):
        assert main(["export", "gguf", "--checkpoint", str(reference), "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "dir.gguf").read_bytes()


@pytest.mark.parametrize("reference, expected", [
    ("org/absent", ["org/absent: no such local directory, and org/absent is not in the Hub cache",
                    "HF_HUB_OFFLINE is set: unset it"]),
    ("org/tiny@0123456789abcdef0123456789abcdef01234567", ["org/tiny@0123456789abcdef0123456789abcdef01234567 is "
                                                           "not in the Hub cache"]),
    ("no/such/dir", ["no/such/dir/config.json: no config.json; is no/such/dir a model directory?"]),
])
def test_what_cannot_be_found_offline_is_one_clear_line(offline_hub, capsys, reference, expected):
    assert main(["generate", "--checkpoint", reference, *PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(text in err for text in expected), err


# ---- a stand-in Hub over HTTP --------------------------------------------------------------------


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API responses `snapshot_download` reads: repo info, the file tree, and file resolves
    (HEAD with the commit, ETag and size headers, then GET). `repos` maps repo ids to files; ids
    starting with `org/gated-401`/`org/gated-403` answer file resolves as a gated repo does."""

    repos: dict[str, dict[str, bytes]] = {}
    requests: list[tuple[str, str]] = []
    sha = hashlib.sha1(b"served").hexdigest()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.answer(body=True)

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        self.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if repo_id not in self.repos:
                return self.fail(404, "RepoNotFound") if repo_id != "org/private" else self.fail(401, None)
            if rev not in ("main", self.sha):
                return self.fail(404, "RevisionNotFound")
            files = self.repos[repo_id]
            if action == "revision":
                data = {"id": repo_id, "sha": self.sha, "siblings": [{"rfilename": name} for name in files]}
            else:
                data = [{"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": name}
                        for name, content in files.items()]
            return self.send(json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
        if repo_id.startswith("org/gated-"):
            return self.fail(int(repo_id[-3:]), "GatedRepo")
        content = self.repos[repo_id][name]
        self.send(content, {"X-Repo-Commit": self.sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}, body)

    def send(self, content: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def fail(self, status: int, code: str | None) -> None:
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", "Access to this model is restricted" if code == "GatedRepo" else code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def fake_hub(hub) -> str:
    """The stand-in Hub serving org/mixed (org/tiny's files beside ones lmforge never reads) and two
    gated repos; yields its endpoint."""
    files = {p.name: p.read_bytes() for p in hub["first"].iterdir()}
    files |= {"pytorch_model.bin": b"pickle", "model.gguf": b"GGUF", "flax_model.msgpack": b"flax",
              "README.md": b"# tiny", ".gitattributes": b"*.safetensors filter=lfs"}
    sharded = save_model(load_model(hub["first"]), hub["cache"].parent / "sharded", max_shard_size=40_000,
                         tokenizer=Tokenizer.from_dir(hub["first"]))
    shards = {p.name: p.read_bytes() for p in sharded.iterdir()}
    shards["consolidated.safetensors"] = files["model.safetensors"]  # as Mistral's repos hold beside the shards
    FakeHub.repos = {"org/mixed": files, "org/sharded": shards, "org/gated-401": files, "org/gated-403": files}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.fixture
def online_hub(fake_hub, tmp_path, monkeypatch) -> str:
    """An empty Hub cache and the stand-in Hub as HF_ENDPOINT, online."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at import, in case it was set then
    FakeHub.requests.clear()
    return fake_hub


def test_download_fetches_only_what_lmforge_reads(online_hub, hub, tmp_path, capsys):
    expected = generate(capsys, hub["first"])
    assert main(["generate", "--checkpoint", "org/mixed", *PROMPT]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert err == ""  # huggingface_hub's progress bars are drawn on a terminal only
    downloaded = {path.rsplit("/", 1)[-1] for method, path in FakeHub.requests
                  if method == "GET" and "/resolve/" in path}
    assert downloaded == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"}
    snapshot = tmp_path / "cache" / "models--org--mixed" / "snapshots" / FakeHub.sha
    assert {p.name for p in snapshot.iterdir()} == downloaded
    assert (tmp_path / "cache" / "models--org--mixed" / "refs" / "main").read_text() == FakeHub.sha
    FakeHub.requests.clear()
    assert generate(capsys, "org/mixed") == expected  # the second run downloads nothing
    assert not [r for r in FakeHub.requests if "/resolve/" in r[1]]


def test_sharded_download_fetches_the_indexed_shards_only(online_hub, hub, capsys):
    assert generate(capsys, "org/sharded") == generate(capsys, hub["first"])
    downloaded = {path.rsplit("/", 1)[-1] for method, path in FakeHub.requests
                  if method == "GET" and "/resolve/" in path}
    shards = {name for name in FakeHub.repos["org/sharded"] if name.startswith("model-")}
    assert len(shards) > 1
    assert {name for name in downloaded if name.endswith(".safetensors")} == shards
    assert "model.safetensors.index.json" in downloaded


@pytest.mark.parametrize("reference, expected", [
    ("org/gated-401", "org/gated-401: org/gated-401 is a gated Hub repository; accept its conditions on "),
    ("org/gated-403", "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"),
    ("org/missing", "org/missing: no such local directory, and no Hub repository org/missing (check the name"),
    ("org/private", "no Hub repository org/private (check the name; for a private repository log in with"),
    ("org/mixed@nope", "org/mixed@nope: the Hub repository org/mixed has no revision 'nope'"),
])
def test_hub_refusals_are_one_clear_line(online_hub, capsys, reference, expected):
    assert main(["generate", "--checkpoint", reference, *PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
