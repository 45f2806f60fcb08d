# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`push_to_hub`, `attndb push` and `attndb train --push-to-hub` with the Hub client's network calls intercepted:
`upload_folder` runs for real (its file filtering included) up to the commit, which is recorded instead of sent."""

from __future__ import annotations

import hashlib
import shutil
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo

from attndb_peft.cli import main
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME, MODEL_CARD_NAME, REPO_PLACEHOLDER
from attndb_peft.hub import PushError, files_to_push, push_to_hub
from attndb_peft.loading import AdapterError

ADAPTER_FILES = {EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME}
COMMIT_URL = "https://huggingface.co/me/my-dog/commit/0123456789abcdef"


class FakeHub:
    """Records what `HfApi.create_repo` / `create_commit` are asked; optionally fails one of them."""

    def __init__(self, monkeypatch, fail=None):
        self.repos, self.commits, self.fail = [], [], fail or {}
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub._maybe_fail("create_repo")
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, commit_message=None, **kwargs):
            hub._maybe_fail("create_commit")
            files = {}
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    files[op.path_in_repo] = f.read()
            hub.commits.append({"repo_id": repo_id, "files": files, "message": commit_message, **kwargs})
            return CommitInfo(
                commit_url=COMMIT_URL, commit_message=commit_message, commit_description="", oid="0" * 40
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kwargs: None)  # a POST to the Hub
        # one commit through create_commit (the hf_xet pipeline would split and stream it)
        monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)

    def _maybe_fail(self, name):
        if name in self.fail:
            raise self.fail[name]


def _http_error(status):
    from types import SimpleNamespace

    from huggingface_hub.errors import HfHubHTTPError

    # what HfHubHTTPError reads of an HTTP response (the HTTP client library differs between hub versions)
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return HfHubHTTPError(f"{status} Client Error", response=response)


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def adapter_folder(trained, tmp_path):
    """A finished output folder: adapter files, checkpoints, samples, and leftovers that must not be pushed."""
    folder = tmp_path / "out"
    shutil.copytree(trained.output_dir, folder)
    assert (folder / "checkpoints").is_dir()
    (folder / "samples").mkdir(exist_ok=True)
    (folder / "samples" / "beach.png").write_bytes(b"\x89PNG fake")
    (folder / "samples" / "snow.jpg").write_bytes(b"\xff\xd8 fake")
    (folder / ".export-tmp").mkdir()
    (folder / ".export-tmp" / LORA_NAME).write_bytes(b"half-written")
    (folder / "notes.txt").write_text("private notes")
    (folder / "learned_embeds.bin").write_bytes(b"\x80 a pickle")
    return folder


def test_push_uploads_exactly_the_adapter_files_card_and_samples(adapter_folder, monkeypatch):
    hub = FakeHub(monkeypatch)
    before = _digest(adapter_folder)
    url = push_to_hub(adapter_folder, "me/my-dog", private=True, token="hf_write")
    assert url == COMMIT_URL
    assert hub.repos == [
        {"repo_id": "me/my-dog", "token": "hf_write", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    (commit,) = hub.commits
    expected = ADAPTER_FILES | {"samples/beach.png", "samples/snow.jpg"}
    assert set(commit["files"]) == expected == set(files_to_push(adapter_folder))
    assert commit["token"] == "hf_write" and commit["message"] == "Upload attndb concept <attndb-dog>"
    for name in expected - {MODEL_CARD_NAME}:
        assert commit["files"][name] == (adapter_folder / name).read_bytes(), name
    card = commit["files"][MODEL_CARD_NAME].decode()
    assert 'pipe.load_attndb("me/my-dog")' in card and REPO_PLACEHOLDER not in card
    assert _digest(adapter_folder) == before  # the local folder (its card included) is untouched


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ("create_commit", _http_error(401), "hf auth login"),
        ("create_commit", _http_error(403), "write access"),
        ("create_repo", ConnectionError("Name or service not known"), "could not be reached"),
        ("create_repo", _http_error(500), "HTTP 500"),
    ],
)
def test_push_failure_is_explained_and_leaves_the_folder_intact(where, error, message, adapter_folder, monkeypatch):
    FakeHub(monkeypatch, fail={where: error})
    before = _digest(adapter_folder)
    with pytest.raises(PushError, match=message) as info:
        push_to_hub(adapter_folder, "me/my-dog")
    assert "The local folder is unchanged" in str(info.value) and f"attndb push {adapter_folder}" in str(info.value)
    assert _digest(adapter_folder) == before


def test_push_refuses_an_unfinished_folder_or_a_bad_repo_id_before_any_request(adapter_folder, monkeypatch):
    hub = FakeHub(monkeypatch)
    with pytest.raises(AdapterError, match="not a Hub repo id"):
        push_to_hub(adapter_folder, "no namespace")
    (adapter_folder / KOHYA_NAME).unlink()
    with pytest.raises(AdapterError, match=f"missing {KOHYA_NAME}"):
        push_to_hub(adapter_folder, "me/my-dog")
    assert hub.repos == [] and hub.commits == []


def test_cli_push(adapter_folder, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    assert main(["push", str(adapter_folder), "me/my-dog", "--private", "--commit-message", "v1"]) == 0
    assert capsys.readouterr().out.strip() == COMMIT_URL
    assert hub.repos[0]["private"] is True and hub.commits[0]["message"] == "v1"

    hub.fail["create_commit"] = _http_error(401)
    assert main(["push", str(adapter_folder), "me/my-dog"]) == 1
    assert "hf auth login" in capsys.readouterr().err
    assert main(["push", str(adapter_folder / "missing"), "me/my-dog"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_train_pushes_when_asked(adapter_folder, monkeypatch, capsys):
    """`attndb train ... --push-to-hub REPO` pushes the finished folder (the training itself is stubbed: the push
    wiring is what is tested here)."""
    from attndb_peft import trainer as trainer_module

    hub = FakeHub(monkeypatch)

    class StubTrainer:
        accelerator = SimpleNamespace(is_main_process=True)

        def __init__(self, config):
            self.config = config

        def run(self):
            return trainer_module.TrainResult(output_dir=adapter_folder, token=self.config.token)

    monkeypatch.setattr(trainer_module, "Trainer", StubTrainer)
    args = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", str(adapter_folder)]
    assert main([*args, "--push-to-hub", "me/my-dog"]) == 0
    assert capsys.readouterr().out.strip() == str(adapter_folder)
    assert [c["repo_id"] for c in hub.commits] == ["me/my-dog"]
    assert main([*args, "--push-to-hub", "not a repo"]) == 2  # refused before training
    assert "not a Hub repo id" in capsys.readouterr().err and len(hub.commits) == 1
