r"""push_to_hub against a loopback Hub (tests/hub_server.py): what arrives, in one commit, and failed uploads."""

import hashlib
import os

import pytest
from hub_server import FakeHub
from huggingface_hub import ModelCard

import hfprune
from hfprune import HubUploadError, PruningConfig


TOKEN = "hf_loopback_test_token"
REPO = "me/tiny-2of4"


@pytest.fixture
def hub(monkeypatch, request):
    r"""A fake Hub on 127.0.0.1; huggingface_hub sends every request there (nothing reaches the network)."""
    import huggingface_hub.constants

    lfs_suffixes = getattr(request, "param", ())
    with FakeHub(lfs_suffixes=lfs_suffixes) as fake:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.endpoint)
        template = fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield fake


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    info = {"base_model": "org/tiny-llama", "perplexity": {"dense": 130.0, "pruned": 150.0}}
    path = hfprune.save_pruned(model, tmp_path / "tiny-2of4", config, report, model_card_info=info)
    return model, config, report, path


def snapshot(folder: str) -> dict[str, str]:
    r"""Relative path -> sha256 of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def api_requests(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if r[1].startswith(("/api/repos", "/api/models", "/me/"))]


def test_push_folder_sends_every_file_in_one_commit(hub, checkpoint):
    _, _, _, path = checkpoint
    before = snapshot(path)
    url = hfprune.push_to_hub(path, REPO, token=TOKEN, private=True)
    assert url == f"{hub.endpoint}/{REPO}"
    assert hub.private == {REPO: True}
    assert len(hub.commits) == 1
    assert hub.commits[0]["summary"] == "Upload 2:4 sparse model (magnitude) with hfprune"
    uploaded = hub.repos[REPO]
    assert set(uploaded) == set(before)
    for name in before:
        if name != "README.md":
            with open(os.path.join(path, name), "rb") as f:
                assert uploaded[name] == f.read(), name
    card = ModelCard(uploaded["README.md"].decode())  # regenerated for the repo
    assert card.data.base_model == "org/tiny-llama" and "2:4" in card.data.tags
    assert f'from_pretrained("{REPO}")' in card.text and "| this model | 150.00 |" in card.text
    assert [r[:2] for r in api_requests(hub)] == [
        ("POST", "/api/repos/create"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in api_requests(hub))
    assert snapshot(path) == before  # the local folder is untouched


@pytest.mark.parametrize("hub", [(".safetensors",)], indirect=True)
def test_weights_go_through_lfs(hub, checkpoint, monkeypatch):
    import huggingface_hub._commit_api

    # the Xet protocol (used when `hf_xet` is installed) has no loopback stand-in; test the LFS transfer instead
    monkeypatch.setattr(huggingface_hub._commit_api, "is_xet_available", lambda: False)
    _, _, _, path = checkpoint
    hfprune.push_to_hub(path, REPO, token=TOKEN)
    uploads = [r for r in hub.requests if r[0] == "PUT"]
    assert len(uploads) == 2  # model.safetensors and masks/keep_masks.safetensors
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        assert hub.repos[REPO]["model.safetensors"] == f.read()
    assert len(hub.commits) == 1


def test_push_a_model_or_push_on_save(hub, checkpoint, tmp_path, monkeypatch):
    import hfprune.checkpoints.hub

    model, config, report, _ = checkpoint

    def read_back(*args, **kwargs):
        raise AssertionError("a checkpoint just written and checked is uploaded without reading it back")

    monkeypatch.setattr(hfprune.checkpoints.hub, "verify", read_back)  # what a folder push runs before uploading
    hfprune.push_to_hub(model, "me/from-model", token=TOKEN, config=config, report=report, format="compact")
    assert {"hfprune_compact.safetensors", "COMPACT_FORMAT.txt", "README.md"} <= set(hub.repos["me/from-model"])
    assert "hfprune.load_pretrained(" in hub.repos["me/from-model"]["README.md"].decode()
    path = hfprune.save_pruned(model, tmp_path / "saved", config, report, push_to_hub="me/on-save", token=TOKEN)
    assert set(hub.repos["me/on-save"]) == set(snapshot(path))
    with pytest.raises(ValueError, match="needs its `config=`"):
        hfprune.push_to_hub(model, "me/no-config", token=TOKEN)


@pytest.mark.parametrize(
    ("hub", "fail"), [((".safetensors",), {"lfs_upload": 403}), ((), {"commit": 500})], indirect=["hub"]
)
def test_failed_upload_is_a_clear_error_and_changes_nothing(hub, checkpoint, fail, monkeypatch):
    import huggingface_hub._commit_api

    monkeypatch.setattr(huggingface_hub._commit_api, "is_xet_available", lambda: False)
    _, _, _, path = checkpoint
    before = snapshot(path)
    hub.fail = fail
    with pytest.raises(HubUploadError, match="(?s)pushing .* to me/tiny-2of4 failed: .*local checkpoint is unchanged"):
        hfprune.push_to_hub(path, REPO, token=TOKEN)
    assert hub.repos[REPO] == {} and hub.commits == []
    assert snapshot(path) == before
    hub.fail = {}
    hfprune.push_to_hub(path, REPO, token=TOKEN)  # the retry goes through
    assert set(hub.repos[REPO]) == set(before)


def test_broken_or_foreign_folders_are_not_pushed(hub, checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _, _, _, path = checkpoint
    weights = os.path.join(path, "model.safetensors")
    state_dict = load_file(weights)
    state_dict["model.layers.0.mlp.up_proj.weight"].fill_(1.0)
    save_file(state_dict, weights)
    with pytest.raises(ValueError, match="(?s)refusing to push .*model.layers.0.mlp.up_proj"):
        hfprune.push_to_hub(path, REPO, token=TOKEN)
    (tmp_path / "plain").mkdir()
    torch.save({}, tmp_path / "plain" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no pruning_config.json"):
        hfprune.push_to_hub(tmp_path / "plain", REPO, token=TOKEN)
    assert api_requests(hub) == []


def test_pickles_trainer_state_and_hidden_files_stay_local(hub, checkpoint):
    _, _, _, path = checkpoint
    for extra in ("training_args.bin", "checkpoint-10/optimizer.pt", "checkpoint-10/config.json", ".lock"):
        os.makedirs(os.path.dirname(os.path.join(path, extra)), exist_ok=True)
        with open(os.path.join(path, extra), "wb") as f:
            f.write(b"x")
    hfprune.push_to_hub(path, REPO, token=TOKEN)
    assert not any(name.endswith((".bin", ".pt", ".lock")) or "checkpoint-" in name for name in hub.repos[REPO])


def test_only_the_main_process_uploads(hub, checkpoint, monkeypatch):
    import hfprune.checkpoints.save

    monkeypatch.setattr(hfprune.checkpoints.save, "is_main_process", lambda: False)
    assert hfprune.push_to_hub(checkpoint[3], REPO, token=TOKEN) is None
    assert api_requests(hub) == []


@pytest.mark.parametrize("fmt", ["dense", "compact"])
def test_round_trip_through_the_hub_downloads_safetensors_only(hub, checkpoint, tmp_path, fmt):
    import torch

    model, config, report, _ = checkpoint
    path = hfprune.save_pruned(model, tmp_path / fmt, config, report, format=fmt)
    hfprune.push_to_hub(path, REPO, token=TOKEN)
    hub.repos[REPO]["pytorch_model.bin"] = b"a pickle that must never be fetched"
    loaded = hfprune.load_pretrained(REPO, token=TOKEN, cache_dir=str(tmp_path / "cache"))
    assert loaded.pruning_record["format"] == fmt and hfprune.verify(loaded).ok
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]}
    assert "pytorch_model.bin" not in fetched and "pruning_config.json" in fetched


def test_trainer_output_folder_gets_a_card_and_leaves_its_state_behind(hub, checkpoint, tmp_path):
    model, config, _, _ = checkpoint
    folder = tmp_path / "trainer-output"
    model.save_pretrained(folder)  # what `Trainer.save_model` writes, plus the config alone
    config.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"pickle")
    hfprune.push_to_hub(folder, REPO, token=TOKEN)
    assert set(hub.repos[REPO]) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "pruning_config.json",
    }
    card = ModelCard(hub.repos[REPO]["README.md"].decode())
    assert "2:4" in card.data.tags and "magnitude" in card.data.tags
    assert not (folder / "README.md").exists()  # the local folder is left as it was
