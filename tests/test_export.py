"""``kphi export``: checkpoints that load without kphi, ONNX, the hub upload, and safe output directories."""

import ast
import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest

from processes import run_cli, run_kphi_process
import torch

from kphi.errors import KphiError
from kphi.export import AUTO_MAP, CODE_FILES, EXPORT_MARKER, ExportError, export_model, push_to_hub




@pytest.fixture(scope="module")
def model_dir(trained_model_dir):
    return trained_model_dir


@pytest.fixture(scope="module")
def reference(model_dir):
    """kphi's own model (in-package classes) for the logits every export must reproduce."""
    from transformers import AutoModelForCausalLM

    from kphi import KPhi3ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert isinstance(model, KPhi3ForCausalLM)
    return model


def sample_batch(vocab, batch=3, length=9, seed=1):
    """Token ids with left padding in rows 1 and 2 (mask 0 on their first 2 and 4 positions)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


# A fresh interpreter that cannot import kphi: `python -I` (no PYTHONPATH, no user site) plus a meta-path
# finder, first in line, that refuses `kphi` (the editable install would otherwise find it).
NO_KPHI_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class RefuseKphi(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kphi" or name.startswith("kphi."):
                raise ImportError("kphi is not installed in this environment")
            return None

    sys.meta_path.insert(0, RefuseKphi())
    try:
        import kphi
    except ImportError:
        pass
    else:
        sys.exit("kphi was importable")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    export_dir, batch_file, logits_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)  # it reads config.json too
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save(logits, logits_file)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False)
    print(json.dumps({
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "config_class": type(model.config).__module__ + "." + type(model.config).__name__,
        "kphi_modules": sorted(m for m in sys.modules if m == "kphi" or m.startswith("kphi.")),
        "generation_eos": GenerationConfig.from_pretrained(export_dir).eos_token_id,
        "generated": generated.shape[1] - ids["input_ids"].shape[1],
    }))
    """
)


def test_standalone_export_loads_without_kphi_and_gives_the_same_logits(model_dir, reference, tmp_path):
    out = tmp_path / "standalone"
    result = run_cli("export", str(model_dir), str(out), "--standalone")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", *CODE_FILES, EXPORT_MARKER):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_kphi3.KPhi3Config"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_kphi3.KPhi3ForCausalLM"
    assert config["model_type"] == "kphi3"

    ids, mask = sample_batch(reference.config.vocab_size)
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "batch.pt")
    (tmp_path / "load.py").write_text(NO_KPHI_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), str(out), str(tmp_path / "batch.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["kphi_modules"] == []
    assert report["model_class"].startswith("transformers_modules.") and report["model_class"].endswith(".modeling_kphi3.KPhi3ForCausalLM")
    assert report["config_class"].endswith("configuration_kphi3.KPhi3Config")
    assert report["generation_eos"] == json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert 1 <= report["generated"] <= 3

    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    got = torch.load(tmp_path / "logits.pt")
    assert got.shape == expected.shape
    difference = (got - expected).abs().max().item()
    print(f"standalone export: max |logit difference| = {difference:.3g}")
    assert difference <= 1e-5


def test_the_exported_code_is_kphis_own_modules_copied_by_transformers(model_dir, tmp_path):
    """No source is rewritten: the export carries kphi's files byte for byte, importing only each other."""
    from pathlib import Path

    import kphi
    from kphi.sources.auto import KPhi3Config, KPhi3ForCausalLM

    out = tmp_path / "standalone"
    export_model(model_dir, out, standalone=True)
    package = Path(kphi.__file__).parent / "modeling"
    for name in CODE_FILES:
        text = (out / name).read_text()
        assert text == (package / name).read_text(), name
        assert ".register(" not in text  # transformers registers remote code itself
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in CODE_FILES, ast.unparse(node)
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not node.module.startswith("kphi"), ast.unparse(node)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("kphi") for a in node.names), ast.unparse(node)
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    # the registration is scoped to the export: ordinary saves carry no code
    assert KPhi3Config._auto_class is None and KPhi3ForCausalLM._auto_class is None
    plain = tmp_path / "plain"
    KPhi3ForCausalLM.from_pretrained(model_dir).save_pretrained(plain)
    assert not (plain / "modeling_kphi3.py").exists() and "auto_map" not in json.loads((plain / "config.json").read_text())


def test_onnx_export_matches_pytorch(model_dir, reference, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'kphi[onnx]')")
    out = tmp_path / "onnx"
    result = export_model(model_dir, out, standalone=False, onnx=True)
    assert result.onnx is not None and result.onnx.path == out / "model.onnx"
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["onnx"]["exporter"] == result.onnx.exporter
    print(f"ONNX exporter: {result.onnx.exporter}, opset {result.onnx.opset}")

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    worst = 0.0
    for batch, length in ((3, 9), (1, 1), (2, 17)):  # batch and sequence length are dynamic
        ids, mask = sample_batch(reference.config.vocab_size, batch=max(batch, 3), length=length)
        ids, mask = ids[:batch], mask[:batch]
        mask[:, -1] = 1
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()  # padded positions have no meaningful logits
        difference = (torch.from_numpy(logits)[real] - expected[real]).abs().max().item()
        worst = max(worst, difference)
        assert logits.shape == tuple(expected.shape)
    print(f"ONNX export: max |logit difference| = {worst:.3g}")
    assert worst <= 1e-4


class FakeHub:
    """The hub's HTTP API, as much of it as an upload uses: records what would be created and committed."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.requests = []
        self.created = None
        self.committed = {}

    def respond(self, method, path, authorization, body: bytes):
        self.requests.append((method, path, authorization))
        if path == "/api/repos/create":
            self.created = json.loads(body)
            return 200, {"url": f"{self.endpoint}/{self.created.get('organization')}/{self.created['name']}"}
        if path == "/api/validate-yaml":
            return 200, {}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if "/commit/" in path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": f"{path} is not part of this fake"}

    def __call__(self, request):  # as an httpx2 transport handler
        import httpx2

        status, payload = self.respond(request.method, request.url.path, request.headers.get("authorization"), request.content)
        return httpx2.Response(status, json=payload)


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    from huggingface_hub.utils import _http

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    from huggingface_hub import constants

    hub = FakeHub(constants.ENDPOINT)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), event_hooks={"request": [_http.hf_request_event_hook]}))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_push_to_hub_creates_the_repo_and_uploads_the_standalone_export(model_dir, fake_hub, tmp_path):
    result = push_to_hub(model_dir, "kphi-user/tiny-kphi3", private=True, token="hf_test_token", out=tmp_path / "pushed")
    assert fake_hub.created["name"] == "tiny-kphi3" and fake_hub.created["organization"] == "kphi-user"
    assert fake_hub.created.get("visibility") == "private" or fake_hub.created.get("private") is True
    assert result.url.endswith("kphi-user/tiny-kphi3")
    uploads = [r for r in fake_hub.requests if r[1].startswith("/api/models/kphi-user/tiny-kphi3/")]
    assert uploads and all(auth == "Bearer hf_test_token" for _, _, auth in uploads)
    sent = fake_hub.committed
    for name in ("config.json", "model.safetensors", "modeling_kphi3.py", "configuration_kphi3.py", "block.py",
                 "tokenizer.json", "generation_config.json", "README.md"):
        assert name in sent, name
        assert sent[name] == (tmp_path / "pushed" / name).read_bytes()
    assert EXPORT_MARKER not in sent
    assert json.loads(sent["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_kphi3.KPhi3ForCausalLM"


def test_hub_errors_become_export_errors(model_dir, fake_hub, tmp_path):
    import httpx2
    from huggingface_hub.utils import _http

    refuse = lambda request: httpx2.Response(403, json={"error": "You don't have the rights"})  # noqa: E731
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(refuse)))
    with pytest.raises(ExportError, match="upload to the hub repository kphi-user/tiny failed"):
        push_to_hub(model_dir, "kphi-user/tiny", token="hf_test_token", out=tmp_path / "pushed")
    assert (tmp_path / "pushed" / "modeling_kphi3.py").is_file()  # the local export stays for a retry


def test_export_refuses_an_occupied_directory_and_replaces_a_previous_export(model_dir, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    result = run_cli("export", str(model_dir), str(occupied))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "not empty and holds no kphi export" in result.stderr
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]

    out = tmp_path / "export"
    export_model(model_dir, out)
    (out / "stale.txt").write_text("from the previous export")
    export_model(model_dir, out)  # a previous export is replaced as a whole
    assert (out / "modeling_kphi3.py").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "occupied"]  # no temporary leftovers


def test_a_failed_export_leaves_nothing_behind(model_dir, tmp_path, monkeypatch):
    def broken_onnx(*args, **kwargs):
        raise ExportError("ONNX export failed: simulated")

    monkeypatch.setattr("kphi.export.export_onnx", broken_onnx)
    with pytest.raises(ExportError, match="simulated"):
        export_model(model_dir, tmp_path / "out", standalone=True, onnx=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, error, message", [
    ("missing", "SourceError", "does not exist"),  # each raised where it is detected, as that module's error
    ("not-a-model", "ModelDirError", "not a model directory"),
    ("not-kphi3", "ExportError", "kphi's model types"),
])
def test_export_rejects_what_is_not_a_kphi3_model(tmp_path, case, error, message):
    source = tmp_path / "source"
    if case != "missing":
        source.mkdir()
    if case == "not-kphi3":
        (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(KphiError, match=message) as caught:
        export_model(source, tmp_path / "out")
    assert type(caught.value).__name__ == error and not (tmp_path / "out").exists()


def test_export_command_pushes_to_the_hub(model_dir, tmp_path):
    """``kphi export --push-to-hub`` end to end, against a local stand-in for the hub (HF_ENDPOINT)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.answer(b"")

        def do_POST(self):
            self.answer(self.rfile.read(int(self.headers.get("content-length", 0))))

        def answer(self, body):
            status, payload = hub.respond(self.command, self.path.split("?")[0], self.headers.get("authorization"), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint = f"http://127.0.0.1:{server.server_port}"
    hub = FakeHub(endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf"),
                  "HF_HUB_DISABLE_TELEMETRY": "1"}  # the fake hub is the only one reachable
        # a process of its own: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported
        result = run_kphi_process("export", model_dir, "--push-to-hub", "kphi-user/tiny", "--private", env=online,
                                  timeout=300)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert f"uploaded to {endpoint}/kphi-user/tiny" in result.stdout
    assert hub.created["name"] == "tiny" and (hub.created.get("visibility") == "private" or hub.created.get("private") is True)
    assert {"config.json", "model.safetensors", "modeling_kphi3.py"} <= set(hub.committed)
    assert json.loads(hub.committed["config.json"])["auto_map"]["AutoConfig"] == "configuration_kphi3.KPhi3Config"
