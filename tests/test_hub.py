"""Loading from the Hugging Face hub never waits on a hub it cannot reach: one short request decides,
then the local cache is read or the load fails at once (huggingface_hub alone retries for minutes).
The same for OpenAI's clip package, which downloads with no timeout. The hub here is a local HTTP
server, or a local port nothing listens on: no test reaches the network."""
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ldm.checkpoints import CheckpointError
from ldm.hub import ModelUnavailable, pretrained_source, url_unreachable
from ldm.modules.encoders import modules
from ldm.modules.encoders.modules import BERTTokenizer, TextEncoderLoadError, load_openai_clip
from conftest import REPO, TINY_CONFIG


class _Hub(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.server.requests.append(self.path)
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_hub(monkeypatch):
    """A hub endpoint that answers every HEAD with its `status` (200); `requests` lists the paths asked for."""
    from huggingface_hub import constants
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.requests, server.status = [], 200
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


def closed_port():
    with socket.socket() as s:  # a port just given back: nothing listens there, connecting is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return constants.ENDPOINT


@pytest.fixture
def trickling_hub(monkeypatch):
    """A hub endpoint (a proxy, a captive portal) that sends a byte every 0.1 s for 3 s and never a
    whole answer; the probe's timeout made 0.5 s: each read gets its byte in time."""
    from huggingface_hub import constants
    from ldm import hub
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        connection, _ = listener.accept()
        with connection:
            for _ in range(30):
                if stop.wait(0.1):
                    return
                try:
                    connection.sendall(b"H")
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield constants.ENDPOINT
    stop.set()
    listener.close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; `hub_cache("org/name")` puts a snapshot of that id in it."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def add(repo_id):
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        return str(snapshot)

    return add


def test_a_folder_is_read_as_it_is_without_asking_the_hub(tmp_path, answering_hub, hub_cache):
    assert pretrained_source(str(tmp_path)) == str(tmp_path)
    snapshot = hub_cache("org/model")
    assert pretrained_source(os.path.dirname(os.path.dirname(snapshot))) == snapshot  # models--org--model
    assert answering_hub.requests == []


def test_a_path_that_is_no_folder_is_one_line_without_asking_the_hub(tmp_path, answering_hub):
    for path in (str(tmp_path / "nope"), "./tokenizer", "models/bert/tokenizer"):
        with pytest.raises(ModelUnavailable, match=r"^'.+': no such folder \(nor can it be a Hugging Face hub id\)$"):
            pretrained_source(path)
    assert answering_hub.requests == []


def test_a_hub_that_answers_is_asked_once_and_gets_the_id(answering_hub, hub_cache):
    hub_cache("org/model")  # cached, but the hub answers: from_pretrained checks for updates as usual
    assert pretrained_source("org/model") == "org/model"
    assert answering_hub.requests == ["/"]


def test_a_hub_answering_with_a_server_error_counts_as_unreachable(answering_hub, hub_cache):
    answering_hub.status = 502  # e.g. a proxy that cannot reach it: downloads would retry for minutes
    snapshot = hub_cache("org/model")
    assert pretrained_source("org/model") == snapshot
    with pytest.raises(ModelUnavailable, match=r"and the hub at http://127\.0\.0\.1:\d+ answers HTTP 502$"):
        pretrained_source("org/other")


def test_an_unreachable_hub_means_the_cached_snapshot(unreachable_hub, hub_cache):
    snapshot = hub_cache("org/model")
    assert pretrained_source("org/model") == snapshot


def test_offline_means_the_cached_snapshot_without_a_request(answering_hub, hub_cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = hub_cache("org/model")
    assert pretrained_source("org/model") == snapshot
    with pytest.raises(ModelUnavailable, match=r"'org/other' is neither .* and the hub is switched off \(HF_HUB_OFF"):
        pretrained_source("org/other")
    assert answering_hub.requests == []


def test_an_unreachable_hub_without_a_cached_copy_is_one_line_at_once(unreachable_hub, hub_cache):
    with pytest.raises(ModelUnavailable) as info:
        pretrained_source("org/model")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("'org/model' is neither a local folder nor in the Hugging Face cache")
    assert f"the hub at {unreachable_hub} cannot be reached" in message


def test_ldm_bert_tokenizer_fails_at_once_when_the_hub_cannot_be_reached(unreachable_hub, hub_cache):
    # upstream's txt2img-1p4B config; before, 3 1/2 minutes of retries, then (transformers 5) an error
    # about a tokenizer knowing only special tokens that did not say the hub was the cause
    with pytest.raises(TextEncoderLoadError, match=r"^Cannot load the BERT tokenizer: 'bert-base-uncased' is "
                                                   r"neither .* cannot be reached .*huggingface-cli download"):
        BERTTokenizer()


def test_safety_checker_from_an_unreachable_hub_is_one_line(tmp_path):
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        [sys.executable, "scripts/txt2img.py", "--config", TINY_CONFIG, "--random-weights", "--prompt", "a cat",
         "--n_samples", "1", "--ddim_steps", "2", "--H", "256", "--W", "256", "--safety-checker",
         "--outdir", tmp_path / "out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # retrying took minutes
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("error: --safety-checker could not load CompVis/stable-diffusion-safety-checker: ")
    assert f"the hub at {env['HF_ENDPOINT']} cannot be reached" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("status, reason", [(200, ""), (405, ""), (404, "answers HTTP 404"), (503, "answers HTTP 503")])
def test_a_download_url_is_asked_once_and_its_answer_read(answering_hub, status, reason):
    answering_hub.status = status  # 405: the server takes no HEAD, which says nothing of a download
    assert url_unreachable(f"{answering_hub.url}/models/a.pt") == reason
    assert answering_hub.requests == ["/models/a.pt"]


def test_a_download_url_nothing_answers_at_is_a_reason(unreachable_hub):
    assert url_unreachable(f"{unreachable_hub}/a.pt").startswith("cannot be reached (<urlopen error [Errno")


@pytest.fixture
def openai_clip(tmp_path, monkeypatch):
    """tests/clip_stand_in as the clip package, its cache an empty tmp_path/clip."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "clip_stand_in"))
    monkeypatch.delitem(sys.modules, "clip", raising=False)
    import clip
    monkeypatch.setattr(modules, "OPENAI_CLIP_CACHE", str(tmp_path / "clip"))
    yield clip
    sys.modules.pop("clip", None)


def test_openai_clip_weights_in_its_cache_load_without_a_request(openai_clip, answering_hub, tmp_path):
    openai_clip._MODELS["ViT-L/14"] = f"{answering_hub.url}/ViT-L-14.pt"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "ViT-L-14.pt").write_bytes(b"weights")
    assert isinstance(load_openai_clip("ViT-L/14"), openai_clip.TextModel)
    (tmp_path / "own.pt").write_bytes(b"weights")  # a file of one's own, given by its path
    with pytest.raises(CheckpointError, match="own.pt would be loaded by OpenAI CLIP's clip.load, which can run code "
                                              "the file carries; if you trust the file, pass --unsafe-pickle"):
        load_openai_clip(str(tmp_path / "own.pt"))  # nothing checks a file's sum, as clip.load does a download's
    assert isinstance(load_openai_clip(str(tmp_path / "own.pt"), unsafe_pickle=True), openai_clip.TextModel)
    assert answering_hub.requests == []


def test_openai_clip_downloads_into_its_cache_when_the_url_answers(openai_clip, answering_hub, tmp_path):
    openai_clip._MODELS["ViT-L/14"] = f"{answering_hub.url}/ViT-L-14.pt"
    with pytest.raises(RuntimeError, match=f"downloads nothing: {tmp_path / 'clip' / 'ViT-L-14.pt'} is missing"):
        load_openai_clip("ViT-L/14")  # clip.load itself was asked, to download into the cache
    assert answering_hub.requests == ["/ViT-L-14.pt"]


def test_openai_clip_weights_neither_cached_nor_reachable_are_one_line(openai_clip, unreachable_hub, tmp_path):
    openai_clip._MODELS["ViT-L/14"] = f"{unreachable_hub}/ViT-L-14.pt"
    with pytest.raises(ModelUnavailable) as info:
        load_openai_clip("ViT-L/14")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"OpenAI CLIP ViT-L/14 is not in {tmp_path / 'clip'} and {unreachable_hub}/ViT-L-14.pt "
                              "cannot be reached (")
    assert message.endswith("download it there where there is network, or pass the path of its .pt file instead "
                            "of 'ViT-L/14'")


@pytest.mark.parametrize("ask", ["hub", "url"])
def test_a_hub_that_trickles_bytes_is_given_up_on_in_twice_the_probe_time(trickling_hub, hub_cache, ask):
    """Each read got its byte within the socket timeout: the request had waited as long as it trickled."""
    if ask == "hub":
        with pytest.raises(ModelUnavailable, match="cannot be reached .no whole answer within 1 s"):
            pretrained_source("org/model")
    else:
        assert url_unreachable(trickling_hub + "/model.pt") == "cannot be reached (no whole answer within 1 s)"
